"""Task: task-shift interventions on a scan's pairs, with their controls and (optionally) a
held-out probe's view (CLI ``intervene``, stages ``interventions[-<model>]``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beyond_top1.figures import plot_intervention_success
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.interventions import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_PAIRS,
    SUMMARY_COLUMNS,
    InterventionResult,
    intervene,
    load_interventions,
)
from beyond_top1.interventions.result import FOLDER_KIND
from beyond_top1.probes import text_hash
from beyond_top1.scans import ScanResult
from beyond_top1.tasks.common import AnalysisUnavailable, figure

FIGURE = "intervention_success"


@dataclass(frozen=True)
class InterventionsConfig:
    """What :func:`~beyond_top1.interventions.intervene` is given. ``targets_from``: only texts
    with this index or later hold targets (e.g. those a held-out probe was not fitted on); with
    a probe and ``targets_from = 0`` the texts the probe was fitted on are left out."""

    a: int | None = None
    delta: int | None = None
    max_distance: int = DEFAULT_MAX_DISTANCE
    max_pairs: int | None = DEFAULT_MAX_PAIRS
    direction: str = "forward"
    controls: bool = True
    targets_from: int = 0
    runs_per_batch: int = 32
    engine: str = "auto"
    seed: int = 0


def run(
    model,
    config: InterventionsConfig,
    out: str | Path | OutputFolder,
    scan: ScanResult,
    *,
    lens=None,
    probe=None,
    progress: bool = True,
) -> InterventionResult:
    """Pairs, patched runs and rates; writes the result's tables, ``summary.json`` and a
    figure. Raises :class:`AnalysisUnavailable` when the scan has no pairs."""
    n_texts = len(scan.texts) if scan.texts is not None else scan.settings.get("n_texts", 0)
    targets = range(config.targets_from, n_texts)
    if probe is not None and not config.targets_from and scan.texts is not None:
        fitted = set(getattr(probe, "metadata_", {}).get("text_hashes") or ())
        targets = [t for t in targets if text_hash(scan.texts[t]) not in fitted]
        if not targets:
            raise AnalysisUnavailable(
                f"the probe was fitted on all {n_texts} texts of the scan, so its evidence "
                "there would be in-sample: fit it on other texts (e.g. --split train), or use "
                "the held-out probe of `probe --held-out`"
            )
    try:
        result = intervene(
            model,
            scan,
            lens=lens,
            a=config.a,
            delta=config.delta,
            max_distance=config.max_distance,
            max_pairs=config.max_pairs,
            direction=config.direction,
            text_ids=targets,
            controls=config.controls,
            probe=probe,
            runs_per_batch=config.runs_per_batch,
            engine=config.engine,
            seed=config.seed,
            progress=progress,
        )
    except ValueError as exc:
        raise AnalysisUnavailable(f"interventions: {exc}") from None
    if len(result.pairs) == 0:
        raise AnalysisUnavailable(
            "no source/target pairs (same text, same final top-1, s_1 gap >= Δ): scan more texts"
        )
    with output_folder(out, FOLDER_KIND) as folder:
        result.save(folder)
        by_offset = result.by_offset()
        if len(by_offset):
            figure(folder, plot_intervention_success(by_offset), FIGURE)
    return result


def load(out: str | Path) -> InterventionResult:
    return load_interventions(out)


def headline(result: InterventionResult) -> dict:
    """Pairs, Δ, and per sign of ``d`` the rates of :data:`SUMMARY_COLUMNS`."""
    out = {"n_pairs": len(result.pairs), "delta": result.settings.get("delta")}
    for row in result.by_sign().to_dict(orient="records"):
        key = "d_ge_0" if ">=" in str(row["offsets"]) else "d_lt_0"
        out[key] = {c: row.get(c) for c in SUMMARY_COLUMNS if c in row}
    return out


def describe(result: InterventionResult) -> str:
    """The per-offset and per-sign tables, as text."""
    by_offset = result.by_offset()
    present = [c for c in SUMMARY_COLUMNS if c in by_offset.columns]
    lines = [
        f"# {len(result.pairs)} {result.settings['direction']} pairs (Δ = "
        f"{result.settings['delta']})"
    ]
    if len(by_offset):
        lines.append(by_offset[["d", *present]].round(3).to_string(index=False))
        lines.append(result.by_sign()[["offsets", *present]].round(3).to_string(index=False))
    return "\n".join(lines)


__all__ = ["InterventionsConfig", "describe", "headline", "load", "run"]
