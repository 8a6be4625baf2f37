"""Task: simulated token-level early exit: signals from one scan, θ curves, the layers-saved
table and 001's better-LM test (CLI ``early-exit simulate``, stage ``early-exit``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from beyond_top1.early_exit import (
    DEFAULT_BETTER_LM_MARGIN,
    ExitSignals,
    better_language_modeling,
    collect_exit_signals,
    early_exit_curves,
    layers_saved_table,
)
from beyond_top1.figures import plot_early_exit_curves
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.lenses import Lens
from beyond_top1.tasks.common import AnalysisUnavailable, figure
from beyond_top1.tasks.texts import TextSpec

KIND = "early-exit"
SIGNALS_DIR = "signals"
CURVES_FILE = "curves.csv"
LAYERS_SAVED_FILE = "layers_saved.csv"
BETTER_LM_FILE = "better_lm.json"
FIGURE = "early_exit"
TABLE_KEYS = ("method", "lens", "saved_at_95", "saved_at_99", "theta_at_95")
BETTER_LM_KEYS = ("rate_early", "rate_late", "n_early", "n_late", "p_value")


@dataclass(frozen=True)
class EarlyExitConfig:
    """``better_lm_m``: 001's margin ``m`` ("early" means ``s_2 <= L-1-m``); ``None``:
    ``min(6, L - 2)``."""

    texts: TextSpec = field(default_factory=lambda: TextSpec(split="val", stop=60))
    max_len: int | None = None
    batch_size: int = 8
    precision: str = "fp32"
    score_first: bool = False
    better_lm_m: int | None = None


@dataclass
class EarlyExitOutcome:
    """The signals, the θ curves, the layers-saved table and the better-LM test."""

    signals: ExitSignals | None
    curves: pd.DataFrame
    layers_saved: pd.DataFrame
    better_lm: dict

    @property
    def n_positions(self) -> int:
        return int(self.curves.loc[self.curves["method"] == "full", "n"].iloc[0])

    @property
    def full_accuracy(self) -> float:
        """Accuracy of the model's own top-1 (no exit) against the gold next token."""
        return float(self.curves.loc[self.curves["method"] == "full", "accuracy"].iloc[0])


def run(
    model,
    config: EarlyExitConfig,
    out: str | Path | OutputFolder,
    lenses: Mapping[str, Lens],
    *,
    probe=None,
    progress: bool = True,
) -> EarlyExitOutcome:
    """One scan of ``config.texts`` through ``lenses`` (and ``probe``), then every criterion;
    writes ``signals/``, ``curves.csv``, ``layers_saved.csv``, ``better_lm.json`` and the
    figure."""
    texts = config.texts.load()
    if not texts:
        raise AnalysisUnavailable("no early-exit texts")
    try:
        signals = collect_exit_signals(
            model,
            texts,
            lenses,
            probe=probe,
            batch_size=config.batch_size,
            max_len=config.max_len,
            precision=config.precision,
            progress=progress,
            score_first=config.score_first,
        )
    except ValueError as exc:
        raise AnalysisUnavailable(f"early exit: {exc}") from None
    curves = early_exit_curves(signals)
    table = layers_saved_table(curves)
    m = config.better_lm_m
    m = min(DEFAULT_BETTER_LM_MARGIN, signals.n_layers - 2) if m is None else m
    better = better_language_modeling(signals, m=m)
    with output_folder(out, KIND) as folder:
        signals.save(folder.claim(SIGNALS_DIR))  # a folder of its own (one writer: this one)
        folder.write_csv(CURVES_FILE, curves)
        folder.write_csv(LAYERS_SAVED_FILE, table)
        folder.write_json(BETTER_LM_FILE, better.to_dict())
        figure(folder, plot_early_exit_curves(curves), FIGURE)
    return EarlyExitOutcome(signals, curves, table, better.to_dict())


def load(out: str | Path) -> EarlyExitOutcome:
    """The tables and the better-LM test of a finished run (signals: ``load_exit_signals``)."""
    out = Path(out)
    better = json.loads((out / BETTER_LM_FILE).read_text(encoding="utf-8"))
    return EarlyExitOutcome(
        None, pd.read_csv(out / CURVES_FILE), pd.read_csv(out / LAYERS_SAVED_FILE), better
    )


def headline(outcome: EarlyExitOutcome) -> dict:
    """Positions, full-depth accuracy, layers saved per criterion and the better-LM test."""
    return {
        "n_positions": outcome.n_positions,
        "full_accuracy": outcome.full_accuracy,
        "layers_saved": [
            {key: row[key] for key in TABLE_KEYS}
            for row in outcome.layers_saved.to_dict(orient="records")
        ],
        "better_lm": {k: outcome.better_lm[k] for k in BETTER_LM_KEYS},
    }


def describe(outcome: EarlyExitOutcome) -> str:
    better = outcome.better_lm
    return "\n".join(
        [
            outcome.layers_saved.round(3).to_string(index=False),
            f"better-LM (m={better['m']}): rank-2 correct {better['rate_early']:.3f} "
            f"(n={better['n_early']}) when s_2 is early vs {better['rate_late']:.3f} "
            f"(n={better['n_late']}) at the last layer, p={better['p_value']:.3g}",
        ]
    )


__all__ = ["EarlyExitConfig", "EarlyExitOutcome", "describe", "headline", "load", "run"]
