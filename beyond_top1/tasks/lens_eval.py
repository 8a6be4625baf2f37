"""Task: per-layer metrics of lenses on held-out texts (CLI ``eval-lens``, stage
``lens-metrics``), optionally with the layer × layer quality-of-fit map."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from beyond_top1 import distributed
from beyond_top1.figures import plot_lens_metrics, plot_quality_of_fit
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.lenses import Lens
from beyond_top1.lenses.metrics import evaluate_lenses, quality_of_fit_matrix
from beyond_top1.tasks.common import figure
from beyond_top1.tasks.texts import TextSpec

KIND = "eval-lens"
METRICS_FILE = "lens_metrics.csv"
METRICS_JSON = "lens_metrics.json"
QUALITY_FILE = "quality_of_fit.csv"


@dataclass(frozen=True)
class LensEvalConfig:
    texts: TextSpec = field(default_factory=lambda: TextSpec(split="val", stop=200))
    max_len: int | None = None
    batch_size: int = 8
    score_first: bool = False
    quality_of_fit_texts: TextSpec | None = None  # fit texts of the l -> l' map (None: skip)


def run(
    model,
    config: LensEvalConfig,
    out: str | Path | OutputFolder,
    lenses: Mapping[str, Lens],
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """``lens_metrics.csv``/``.json`` (one row per lens and layer) and a figure per metric;
    with ``quality_of_fit_texts`` also ``quality_of_fit.csv`` and its figure."""
    stream = {"batch_size": config.batch_size, "max_len": config.max_len, "progress": progress}
    stream["score_first"] = config.score_first
    where = distributed.ranks()  # under torchrun: every rank computes, rank 0 writes
    with distributed.on_main(lambda: output_folder(out, KIND), where) as folder:
        frame = evaluate_lenses(model, lenses, config.texts.load(), **stream)
        matrix = None
        if config.quality_of_fit_texts is not None:
            fit, val = config.quality_of_fit_texts.load(), config.texts.load()
            matrix = quality_of_fit_matrix(model, fit, val, **stream)

        def write() -> None:
            if folder is None:
                return
            folder.write_csv(METRICS_FILE, frame)
            folder.write_text(METRICS_JSON, frame.to_json(orient="records", indent=1))
            for metric, fig in plot_lens_metrics(frame).items():
                figure(folder, fig, metric)
            if matrix is not None:
                folder.write_csv(QUALITY_FILE, matrix)
                figure(folder, plot_quality_of_fit(matrix), "quality_of_fit")

        distributed.run_checked(write, where)
    return frame


def load(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / METRICS_FILE)


def headline(frame: pd.DataFrame, n_layers: int) -> dict:
    """Per lens: KL and Precision@1 at a quarter, half and three quarters of the depth, and
    their means over layers."""
    marks = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
    out = {"layers_reported": marks}
    for name, rows in frame.groupby("lens", sort=False):
        rows = rows.set_index("layer")
        entry = {
            "mean_kl": float(rows["kl"].mean()),
            "mean_precision_at_1": float(rows["precision_at_1"].mean()),
            "n_tokens": int(rows["n_tokens"].iloc[0]),
        }
        for layer in marks:
            if layer in rows.index:
                entry[f"kl_layer_{layer}"] = float(rows.loc[layer, "kl"])
                entry[f"precision_at_1_layer_{layer}"] = float(rows.loc[layer, "precision_at_1"])
        out[str(name)] = entry
    return out


__all__ = ["LensEvalConfig", "headline", "load", "run"]
