"""Matplotlib figures for lens metrics and quality-of-fit matrices.

Figures are built as ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no global
state, no GUI backend, safe in scripts, tests and notebooks (a ``Figure`` renders inline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from beyond_top1.lenses.metrics import LENS_METRICS

METRIC_LABELS = {
    "r2": "r² to the last layer",
    "precision_at_1": "Precision@1",
    "precision_at_5": "Precision@5",
    "precision_at_10": "Precision@10",
    "surprisal": "surprisal (nats)",
    "kl": "KL(p_final ‖ p_lens) (nats)",
    "cross_entropy": "cross-entropy (nats)",
}


def plot_lens_metric(frame: pd.DataFrame, metric: str, ax: Axes | None = None) -> Figure:
    """One line per lens of ``metric`` against the layer (a frame from ``evaluate_lenses``)."""
    if metric not in frame.columns:
        raise KeyError(f"no column {metric!r}; have {list(frame.columns)}")
    if ax is None:
        ax = Figure(figsize=(5.5, 3.5), layout="constrained").subplots()
    for name, rows in frame.groupby("lens", sort=False):
        rows = rows.sort_values("layer")
        ax.plot(rows["layer"], rows[metric], marker="o", markersize=3, label=str(name))
    ax.set_xlabel("layer")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(title="lens")
    return ax.figure


def plot_lens_metrics(frame: pd.DataFrame) -> dict[str, Figure]:
    """:func:`plot_lens_metric` for every metric column of ``frame``."""
    return {m: plot_lens_metric(frame, m) for m in LENS_METRICS if m in frame.columns}


def plot_quality_of_fit(matrix_frame: pd.DataFrame) -> Figure:
    """Two heatmaps, linear map vs. identity, of r² from ``quality_of_fit_matrix`` (004 Fig. 2).

    Rows are source layers, columns target layers (blank: no pair). The colour scale is fixed
    to [0, 1]; lower r² (common for the identity) shows as the lowest colour, marked by the
    colour bar's extension.
    """
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, column, title in zip(
        axes, ("r2_linear", "r2_identity"), ("linear map (mat)", "identity (id)"), strict=True
    ):
        matrix = matrix_frame.pivot(index="source", columns="target", values=column)
        image = ax.imshow(
            np.ma.masked_invalid(matrix.to_numpy(dtype=float)),
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            origin="upper",
        )
        ax.set_xticks(range(matrix.shape[1]), [str(l) for l in matrix.columns], rotation=90)
        ax.set_yticks(range(matrix.shape[0]), [str(l) for l in matrix.index])
        ax.set_xlabel("target layer")
        ax.set_title(title)
    axes[0].set_ylabel("source layer")
    fig.colorbar(image, ax=axes, label="r²", extend="min", shrink=0.9)
    return fig


def save_figure(fig: Figure, path_without_suffix: str | Path) -> tuple[Path, Path]:
    """Write ``fig`` as ``<path>.png`` and ``<path>.svg`` (parents created); return both paths."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = (base.with_name(base.name + ".png"), base.with_name(base.name + ".svg"))
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


__all__ = ["plot_lens_metric", "plot_lens_metrics", "plot_quality_of_fit", "save_figure"]


# ---------------------------------------------------------------------------------------------
# Early exit (issue 6)
# ---------------------------------------------------------------------------------------------

_EXIT_COLORS = {
    "margin": "tab:blue",
    "confidence_004": "tab:orange",
    "cosine": "tab:green",
    "fixed": "tab:gray",
    "probe": "tab:red",
    "probe_conf": "tab:brown",
    "oracle": "tab:purple",
}
_LENS_STYLES = ("-", "--", ":", "-.")
_LENS_MARKERS = ("o", "s", "^", "D")


def plot_early_exit_curves(
    curves: pd.DataFrame, metrics: tuple[str, ...] = ("accuracy", "precision_at_1")
) -> Figure:
    """Accuracy (and Precision@1) against mean layers used for every method and lens.

    ``curves`` comes from :func:`beyond_top1.early_exit.early_exit_curves`. Threshold methods
    are lines (one per lens: line style), the oracle and the probe are single points, the full
    model is a black star.
    """
    fig = Figure(figsize=(6.0 * len(metrics), 5.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharex=True))
    lenses = [l for l in dict.fromkeys(curves["lens"]) if l != "-"]
    labels = {"accuracy": "accuracy vs. gold next token", "precision_at_1": "Precision@1"}
    for ax, metric in zip(axes, metrics, strict=True):
        for (method, lens), group in curves[curves["method"] != "full"].groupby(
            ["method", "lens"], sort=False
        ):
            i = lenses.index(lens) % len(_LENS_STYLES)
            color = _EXIT_COLORS.get(method, None)
            group = group.sort_values("mean_layers")
            if len(group) > 1:
                ax.plot(
                    group["mean_layers"],
                    group[metric],
                    linestyle=_LENS_STYLES[i],
                    color=color,
                    linewidth=1.3,
                    label=f"{method} / {lens}",
                )
            else:
                ax.plot(
                    group["mean_layers"],
                    group[metric],
                    linestyle="none",
                    marker=_LENS_MARKERS[i],
                    markersize=7,
                    color=color,
                    label=f"{method} / {lens}",
                )
        full = curves[curves["method"] == "full"]
        ax.plot(
            full["mean_layers"], full[metric], "k*", markersize=12, label="full model (no exit)"
        )
        ax.set_xlabel("mean layers used")
        ax.set_ylabel(labels.get(metric, metric))
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=5, fontsize=7)
    fig.suptitle("Simulated token-level early exit (no compute skipped)", fontsize=10)
    return fig


__all__ += ["plot_early_exit_curves"]

# --- task probes and interventions (issue 5, task: probes) ----------------------------------------


def _labelled(frames) -> dict[str, pd.DataFrame]:
    return {"": frames} if isinstance(frames, pd.DataFrame) else dict(frames)


def plot_probe_per_layer(
    per_layer, *, chance: float | None = None, min_n: int = 20, ax: Axes | None = None
) -> Figure:
    """Task-probe accuracy per layer (out-of-fold) against the shuffled-label baseline.

    ``per_layer``: ``ProbeCV.per_layer``, or ``{label: per_layer}`` (e.g. one per k). Layers
    with fewer than ``min_n`` held-out rows are left out (their accuracy is noise).
    """
    if ax is None:
        ax = Figure(figsize=(6, 3.5), layout="constrained").subplots()
    for label, frame in _labelled(per_layer).items():
        frame = frame[frame["n"] >= min_n]
        name = f" ({label})" if label else ""
        line = ax.plot(
            frame["layer"],
            frame["balanced_accuracy"],
            marker="o",
            markersize=3,
            label=f"probe{name}",
        )[0]
        if "shuffled_balanced_accuracy" in frame.columns:
            ax.plot(
                frame["layer"],
                frame["shuffled_balanced_accuracy"],
                linestyle="--",
                color=line.get_color(),
                alpha=0.7,
                label=f"shuffled labels{name}",
            )
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xlabel(f"layer (layers with >= {min_n} held-out rows)")
    ax.set_ylabel("balanced accuracy (held-out texts)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


def plot_intervention_success(by_offset, *, ax: Axes | None = None) -> Figure:
    """Task-shift success rate against the offset ``d`` (``InterventionResult.by_offset()``),
    with ±1 SE bars, the strict rate, and the random-vector and own-activation controls.

    ``by_offset``: one frame, or ``{label: frame}`` (e.g. one per model).
    """
    if ax is None:
        ax = Figure(figsize=(6, 3.8), layout="constrained").subplots()
    for label, frame in _labelled(by_offset).items():
        name = f" ({label})" if label else ""
        bars = ax.errorbar(
            frame["d"],
            frame["success_rate"],
            yerr=frame["success_se"],
            marker="o",
            markersize=4,
            capsize=2,
            label=f"patch: s₁ ≤ l, top-1 kept{name}",
        )
        color = bars.lines[0].get_color()
        ax.plot(
            frame["d"],
            frame["strict_rate"],
            marker="s",
            markersize=3,
            linestyle="--",
            color=color,
            alpha=0.8,
            label=f"patch: s₁ = l{name}",
        )
        if "random_success_rate" in frame.columns and frame["random_n"].sum() > 0:
            ax.plot(
                frame["d"],
                frame["random_success_rate"],
                marker="x",
                linestyle=":",
                color=color,
                alpha=0.8,
                label=f"random-vector control{name}",
            )
        ax.plot(
            frame["d"],
            frame["own_success_rate"],
            linestyle="-.",
            color="grey",
            alpha=0.6,
            label=f"own-activation control{name}",
        )
    ax.axvline(-0.5, color="black", linewidth=0.6, alpha=0.4)
    ax.set_xlabel("offset d (patched layer l = s₁(source) + d)")
    ax.set_ylabel("fraction of pairs")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax.figure


__all__ += ["plot_intervention_success", "plot_probe_per_layer"]
