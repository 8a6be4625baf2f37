"""Task: a task-index probe from a scan, cross-validated by text with its shuffled-label
baseline, fitted and saved (CLI ``probe``, stages ``probe-<model>``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from beyond_top1 import distributed
from beyond_top1.figures import plot_probe_per_layer
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.probes import (
    ProbeCV,
    TaskDataset,
    TaskProbe,
    cross_validate_task_probe,
    task_dataset,
)
from beyond_top1.scans import ScanResult
from beyond_top1.tasks.common import AnalysisUnavailable, figure

KIND = "probe"
PROBE_FILE = "probe.safetensors"
HELDOUT_PROBE_FILE = "probe_heldout.safetensors"  # fitted on the first half of the texts
CV_FILE = "cv.json"
FOLDS_FILE = "cv_folds.csv"
PER_CLASS_FILE = "cv_per_class.csv"
PER_LAYER_FILE = "cv_per_layer.csv"
ROWS_FILE = "rows_per_layer.csv"
FIGURE = "probe_per_layer"
HEADLINE_KEYS = (
    "balanced_accuracy_mean",
    "balanced_accuracy_se",
    "shuffled_balanced_accuracy_mean",
    "shuffled_balanced_accuracy_se",
    "macro_auc_mean",
    "shuffled_macro_auc_mean",
    "n_splits",
)


@dataclass(frozen=True)
class ProbeConfig:
    """``n_tasks``: tasks ``1..n_tasks``; ``heldout``: also fit ``probe_heldout.safetensors``
    on the first half of the texts only (held-out evidence for interventions on the rest)."""

    n_tasks: int = 3
    min_layer: int = 0
    max_per_class: int | None = 300
    features: str = "raw"
    folds: int = 5
    C: float = 1.0
    shuffled: bool = True
    heldout: bool = False
    seed: int = 0


@dataclass
class ProbeOutcome:
    """The probe rows' summary, the cross-validation and the fitted probe(s)."""

    dataset: TaskDataset
    cv: ProbeCV
    probe: TaskProbe
    heldout: TaskProbe | None = None


def run(
    model, config: ProbeConfig, out: str | Path | OutputFolder, scan: ScanResult, *, progress=True
) -> ProbeOutcome:
    """Rows from ``scan`` (and its texts), grouped cross-validation, the probe fitted on every
    row; writes the probe file(s), ``cv_*.csv``, ``rows_per_layer.csv``, ``cv.json`` and a
    figure. Raises :class:`AnalysisUnavailable` when the scan cannot give a probe."""
    if scan.k < config.n_tasks:
        raise AnalysisUnavailable(f"the scan tracks k={scan.k} < n_tasks={config.n_tasks}")
    try:
        data = task_dataset(
            model,
            scan,
            n_tasks=config.n_tasks,
            min_layer=config.min_layer,
            max_per_class=config.max_per_class,
            features=config.features,
            seed=config.seed,
            progress=progress,
        )
        cv = cross_validate_task_probe(
            data, n_splits=config.folds, seed=config.seed, C=config.C, shuffled=config.shuffled
        )
        probe = TaskProbe(C=config.C).fit(data)
        heldout = None
        if config.heldout:  # a probe that never saw the second half of the texts
            first_half = data.groups < len(scan.texts or ()) // 2
            heldout = TaskProbe(C=config.C).fit(data.subset(np.flatnonzero(first_half)))
    except ValueError as exc:
        raise AnalysisUnavailable(f"task probe: {exc}") from None

    def write() -> None:  # under torchrun, rank 0 writes; a failure reaches every rank
        if out is None or not distributed.ranks().is_main:
            return
        with output_folder(out, KIND) as folder:
            probe.save(folder.claim(PROBE_FILE))
            if heldout is not None:
                heldout.save(folder.claim(HELDOUT_PROBE_FILE))
            folder.write_csv(FOLDS_FILE, cv.folds)
            folder.write_csv(PER_CLASS_FILE, cv.per_class)
            folder.write_csv(PER_LAYER_FILE, cv.per_layer)
            folder.write_csv(ROWS_FILE, data.counts().reset_index())
            folder.write_json(CV_FILE, {"dataset": data.summary(), "cv": cv.summary()})
            plot = plot_probe_per_layer(cv.per_layer, chance=1 / data.k, min_n=5)
            figure(folder, plot, FIGURE)

    distributed.run_checked(write)
    return ProbeOutcome(data, cv, probe, heldout)


def load(out: str | Path) -> dict:
    """``cv.json`` (``dataset`` and ``cv`` summaries) and the per-task and per-layer tables."""
    out = Path(out)
    summary = json.loads((out / CV_FILE).read_text(encoding="utf-8"))
    summary["per_class"] = pd.read_csv(out / PER_CLASS_FILE)
    summary["per_layer"] = pd.read_csv(out / PER_LAYER_FILE)
    return summary


def headline(outcome: ProbeOutcome | dict) -> dict:
    """Rows, texts, layers, chance and the cross-validated accuracies with their SEs."""
    if isinstance(outcome, ProbeOutcome):
        ds, summary = outcome.dataset.summary(), outcome.cv.summary()
    else:
        ds, summary = outcome["dataset"], outcome["cv"]
    return {
        "k": ds["k"],
        "n_rows": ds["n_rows"],
        "n_texts": ds["n_texts"],
        "layers": [min(ds["layers"]), max(ds["layers"])],
        "chance": 1 / ds["k"],
        **{key: summary.get(key) for key in HEADLINE_KEYS},
    }


def describe(outcome: ProbeOutcome) -> str:
    """One line: balanced accuracy ± SE, the shuffled baseline, rows, texts and chance."""
    s, k = outcome.cv.summary(), outcome.dataset.k
    line = (
        f"task probe, {k} tasks: balanced accuracy {s['balanced_accuracy_mean']:.3f} ± "
        f"{s['balanced_accuracy_se']:.3f} (SE over {s['n_splits']} folds grouped by text)"
    )
    if "shuffled_balanced_accuracy_mean" in s:
        line += (
            f"; shuffled labels {s['shuffled_balanced_accuracy_mean']:.3f} ± "
            f"{s['shuffled_balanced_accuracy_se']:.3f}"
        )
    return line + f"; {s['n_rows']} rows from {s['n_texts']} texts, chance {1 / k:.3f}"


__all__ = [
    "HELDOUT_PROBE_FILE",
    "PROBE_FILE",
    "ProbeConfig",
    "ProbeOutcome",
    "describe",
    "headline",
    "load",
    "run",
]
