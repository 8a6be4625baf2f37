"""Task: 001's ordering statistics of one or more scans, side by side (CLI ``order``, stage
``ordering``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from beyond_top1.figures import (
    plot_ordering_comparison,
    plot_rank_correspondence,
    plot_saturation_histograms,
)
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.saturation import (
    DEFAULT_FILTER_FRACTION,
    DEFAULT_PERMUTATIONS,
    ORDERING_LABELS,
    OrderingStats,
)
from beyond_top1.scans import ScanResult
from beyond_top1.tasks.common import AnalysisUnavailable, figure

KIND = "ordering"
TABLE_FILE = "ordering.csv"
CORRESPONDENCE_FILE = "rank_correspondence.csv"
FIGURES = ("ordering_comparison", "rank_correspondence", "saturation_histograms")
HEADLINE_KEYS = (
    "n_kept",
    "mean_tau",
    "tau_se",
    "p_value_kept",
    "p_value_all",
    "n_permutations",
    "frac_strictly_increasing",
)


@dataclass(frozen=True)
class OrderingConfig:
    n_permutations: int = DEFAULT_PERMUTATIONS
    filter_fraction: float = DEFAULT_FILTER_FRACTION
    seed: int = 0


def statistics(scans: Mapping[str, ScanResult], config: OrderingConfig) -> dict[str, OrderingStats]:
    """The statistics of every scan with ``k >= 3`` and scored positions (computed here: scans do
    not store them)."""
    return {
        label: result.ordering(
            n_permutations=config.n_permutations,
            filter_fraction=config.filter_fraction,
            seed=config.seed,
        )
        for label, result in scans.items()
        if result.k >= 3 and len(result)
    }


def table(stats: Mapping[str, OrderingStats]) -> pd.DataFrame:
    """One row per scan: ``model`` and every scalar statistic."""
    return pd.DataFrame([{"model": label, **st.summary()} for label, st in stats.items()])


def format_table(stats: Mapping[str, Mapping]) -> str:
    """Scans as columns and the statistics of :data:`ORDERING_LABELS` as labelled rows."""
    frame = pd.DataFrame(
        {name: [s.get(key) for key in ORDERING_LABELS] for name, s in stats.items()},
        index=list(ORDERING_LABELS.values()),
    )
    return frame.to_string(float_format=lambda x: f"{x:.4g}")


def run(
    scans: Mapping[str, ScanResult], config: OrderingConfig, out: str | Path | OutputFolder
) -> dict[str, OrderingStats]:
    """``ordering.csv``, ``rank_correspondence.csv`` and three figures."""
    stats = statistics(scans, config)
    if not stats:
        raise AnalysisUnavailable("no scan has k >= 3 and scored positions")
    with output_folder(out, KIND) as folder:
        folder.write_csv(TABLE_FILE, table(stats))
        corr = pd.concat([st.rank_correspondence.assign(model=m) for m, st in stats.items()])
        folder.write_csv(CORRESPONDENCE_FILE, corr)
        wrapped = {label.replace(":", ":\n"): st for label, st in stats.items()}
        plots = (
            plot_ordering_comparison(wrapped),
            plot_rank_correspondence(stats),
            plot_saturation_histograms(stats),
        )
        for name, plot in zip(FIGURES, plots, strict=True):
            figure(folder, plot, name)
    return stats


def load(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / TABLE_FILE)


def headline(stats: Mapping[str, OrderingStats]) -> dict:
    return {label: {k: st.summary().get(k) for k in HEADLINE_KEYS} for label, st in stats.items()}


__all__ = ["OrderingConfig", "format_table", "headline", "load", "run", "statistics", "table"]
