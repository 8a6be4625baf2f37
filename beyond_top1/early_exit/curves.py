"""Curves over thresholds, layers saved at a precision, and comparisons at equal compute."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from beyond_top1.early_exit.criteria import (
    METHODS,
    THRESHOLD_METHODS,
    default_thetas,
    simulate_exit,
)
from beyond_top1.early_exit.signals import ExitSignals


def early_exit_curves(
    signals: ExitSignals,
    methods: Sequence[str] | None = None,
    lenses: Sequence[str] | None = None,
    thetas: Mapping[str, Sequence[float]] | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Precision@1, accuracy and mean layers for every method × lens × θ (one row each).

    Includes a ``full`` row (no exit). ``cosine``, ``probe`` and ``probe_conf`` decide without
    the lens, so they appear once per lens (the lens only makes the prediction). The probe
    methods are skipped when the signals have no probe predictions (probabilities).
    """
    L = signals.n_layers
    methods = tuple(methods) if methods else METHODS
    lenses = tuple(lenses) if lenses else signals.lenses
    grid = default_thetas(L)
    grid.update({k: np.asarray(v, dtype=float) for k, v in (thetas or {}).items()})
    rows = [
        {
            "method": "full",
            "lens": "-",
            "theta": None,
            "precision_at_1": 1.0,
            "accuracy": float(np.mean(signals.final_top1 == signals.gold)),
            "mean_layers": float(L),
            "fraction_saved": 0.0,
            "n": len(signals),
        }
    ]
    for method in methods:
        if method == "probe" and signals.probe_task is None:
            continue
        if method == "probe_conf" and signals.probe_settled is None:
            continue
        for lens in lenses:
            values = grid[method] if method in THRESHOLD_METHODS else [None]
            for theta in values:
                rows.append(simulate_exit(signals, method, lens, theta, **kwargs).row())
    return pd.DataFrame(rows)


def layers_saved_table(
    curves: pd.DataFrame, targets: Sequence[float] = (0.95, 0.99)
) -> pd.DataFrame:
    """ "Fraction of layers saved at X% Precision@1" per method and lens.

    For each target the best grid point is taken (no interpolation): among the θ whose
    Precision@1 reaches the target, the one with the fewest mean layers. NaN when no θ does.
    """
    L = float(curves.loc[curves["method"] == "full", "mean_layers"].iloc[0])
    rows = []
    for (method, lens), group in curves[curves["method"] != "full"].groupby(
        ["method", "lens"], sort=False
    ):
        row = {"method": method, "lens": lens}
        for target in targets:
            tag = f"{round(100 * target):d}"
            ok = group[group["precision_at_1"] >= target]
            if len(ok):
                best = ok.sort_values(["mean_layers", "precision_at_1"], ascending=[True, False])
                best = best.iloc[0]
                row[f"saved_at_{tag}"] = 1.0 - best["mean_layers"] / L
                row[f"theta_at_{tag}"] = best["theta"]
                row[f"accuracy_at_{tag}"] = best["accuracy"]
                row[f"precision_at_{tag}"] = best["precision_at_1"]
            else:
                row[f"saved_at_{tag}"] = math.nan
                row[f"theta_at_{tag}"] = math.nan
                row[f"accuracy_at_{tag}"] = math.nan
                row[f"precision_at_{tag}"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def best_at_budget(curves: pd.DataFrame, max_layers: float, metric: str = "precision_at_1"):
    """Per method and lens, the grid point with the best ``metric`` among those using at most
    ``max_layers`` layers on average (to compare a single-point rule, e.g. ``probe``, with the
    threshold curves at the same compute)."""
    rows = curves[(curves["method"] != "full") & (curves["mean_layers"] <= max_layers + 1e-9)]
    if rows.empty:
        return rows.copy()
    best = rows.sort_values([metric, "mean_layers"], ascending=[False, True])
    return best.groupby(["method", "lens"], sort=False).head(1).reset_index(drop=True)


__all__ = ["best_at_budget", "early_exit_curves", "layers_saved_table"]
