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
# Issue 8: refinement gap vs. evidence position (003), sub-module linear replacement (004 §6)
# ---------------------------------------------------------------------------------------------


def plot_refinement_gap(table: pd.DataFrame, lens: str | None = None) -> Figure:
    """Accuracy and mean refinement gap (± SE) against the relevant document's position, one
    line per number of documents ``N`` (a table from ``refinement_table``, by ``n_docs,
    position``). ``lens`` picks one lens when the table holds several."""
    if lens is not None:
        table = table[table["lens"] == lens]
    elif "lens" in table and table["lens"].nunique() > 1:
        raise ValueError(f"the table holds lenses {sorted(table['lens'].unique())}: pass lens=")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_acc, ax_gap = fig.subplots(1, 2, sharex=True)
    for n_docs, rows in table.groupby("n_docs"):
        rows = rows.sort_values("position")
        line = ax_acc.plot(rows["position"], rows["accuracy"], marker="o", label=f"N = {n_docs}")
        ax_gap.errorbar(
            rows["position"],
            rows["gap_mean"],
            yerr=rows["gap_se"].fillna(0),
            marker="o",
            capsize=3,
            color=line[0].get_color(),
            label=f"N = {n_docs}",
        )
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_ylabel("accuracy (final top-1 = answer)")
    ax_gap.set_ylabel("gap = s_1 - first top-1 layer")
    for ax in (ax_acc, ax_gap):
        ax.set_xlabel("position of the relevant document")
        ax.grid(alpha=0.3)
    ax_gap.legend(title="documents")
    title = f" ({lens} lens)" if lens else ""
    fig.suptitle(f"Refinement gap vs. evidence position{title}")
    ax_gap.xaxis.get_major_locator().set_params(integer=True)
    return fig


REPLACEMENT_STYLES = {"fit": "-", "zero": "--", "identity": ":", "mean": "-."}


def plot_submodule_replacement(frame: pd.DataFrame) -> Figure:
    """Precision@1 and KL(p_orig ‖ p_replaced) against the layer of the replaced sub-module:
    colour = kind, line style = variant (a frame from ``evaluate_replacements``)."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_p, ax_kl = fig.subplots(1, 2, sharex=True)
    colours = {}
    for (kind, variant), rows in frame.groupby(["kind", "variant"], sort=False):
        rows = rows.sort_values("layer")
        style = REPLACEMENT_STYLES.get(variant, "-")
        kwargs = {"linestyle": style, "marker": "o" if variant == "fit" else None, "markersize": 3}
        if kind in colours:
            kwargs["color"] = colours[kind]
        line = ax_p.plot(rows["layer"], rows["precision_at_1"], label=f"{kind} {variant}", **kwargs)
        colours[kind] = line[0].get_color()
        ax_kl.plot(
            rows["layer"],
            rows["kl"].clip(lower=1e-6),
            color=colours[kind],
            **{k: v for k, v in kwargs.items() if k != "color"},
        )
    ax_p.set_ylim(0, 1.02)
    ax_p.set_ylabel("Precision@1 vs. the unmodified model")
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL(p_orig ‖ p_replaced) (nats)")
    for ax in (ax_p, ax_kl):
        ax.set_xlabel("layer of the replaced sub-module")
        ax.grid(alpha=0.3)
    ax_p.legend(fontsize=7, ncol=2)
    return fig


__all__ += ["plot_refinement_gap", "plot_submodule_replacement"]
