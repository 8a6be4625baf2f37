"""Task: 004's sub-module linear replacement: fit the maps, replace each sub-module in turn and
measure the model's output (stage ``replacement``; ``experiments/submodule_replacement.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from beyond_top1.figures import plot_submodule_replacement
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.lenses.least_squares import DEFAULT_RIDGE
from beyond_top1.replacement import (
    DEFAULT_KINDS,
    DEFAULT_VARIANTS,
    SubmoduleMaps,
    evaluate_replacements,
    replacement_summary,
)
from beyond_top1.tasks.common import figure
from beyond_top1.tasks.texts import TextSpec

KIND = "replacement"
TABLE_FILE = "replacement.csv"
FIGURE = "submodule_replacement"


@dataclass(frozen=True)
class ReplacementConfig:
    """Maps of ``kinds`` at ``layers`` (default every block) fitted on ``fit_texts`` with a
    relative ``ridge``, then each replaced by every one of ``variants`` on ``eval_texts``."""

    fit_texts: TextSpec = field(default_factory=lambda: TextSpec(split="train", stop=64))
    eval_texts: TextSpec = field(default_factory=lambda: TextSpec(split="val", stop=6))
    fit_max_len: int | None = None
    eval_max_len: int | None = 64
    batch_size: int = 8
    layers: tuple[int, ...] | None = None
    kinds: tuple[str, ...] = DEFAULT_KINDS
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    ridge: float = DEFAULT_RIDGE


def run(
    model, config: ReplacementConfig, out: str | Path | OutputFolder, *, progress: bool = True
) -> pd.DataFrame:
    """One row per (kind, layer, variant): Precision@1 and KL; writes ``replacement.csv`` and
    its figure."""
    maps = SubmoduleMaps.fit(
        model,
        config.fit_texts.load(),
        layers=config.layers,
        kinds=config.kinds,
        ridge=config.ridge,
        batch_size=config.batch_size,
        max_len=config.fit_max_len,
        progress=progress,
    )
    frame = evaluate_replacements(
        model,
        maps,
        config.eval_texts.load(),
        variants=config.variants,
        batch_size=config.batch_size,
        max_len=config.eval_max_len,
        progress=progress,
    )
    with output_folder(out, KIND) as folder:
        folder.write_csv(TABLE_FILE, frame)
        figure(folder, plot_submodule_replacement(frame), FIGURE)
    return frame


def load(out: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(out) / TABLE_FILE)


def headline(frame: pd.DataFrame) -> dict:
    """Per ``kind/variant``: Precision@1 and KL, each the mean over layers."""
    means = replacement_summary(frame)
    return {
        f"{kind}/{variant}": {
            "precision_at_1": float(means.loc[kind, ("precision_at_1", variant)]),
            "kl": float(means.loc[kind, ("kl", variant)]),
        }
        for kind in means.index
        for variant in means["precision_at_1"].columns
    }


__all__ = ["ReplacementConfig", "headline", "load", "run"]
