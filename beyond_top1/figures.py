"""Matplotlib figures for lens metrics and quality-of-fit matrices.

Figures are built as :class:`Figure` objects (``matplotlib.figure.Figure`` that also shows
itself as a PNG in Jupyter), never through ``pyplot``: no global state, no GUI backend, safe in
scripts, tests and notebooks, and a figure that is a cell's value displays without
``%matplotlib inline``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MatplotlibFigure

from beyond_top1.fileio import write_signed_file
from beyond_top1.lenses.metrics import LENS_METRICS
from beyond_top1.saturation import OrderingStats, saturation_distribution


class Figure(MatplotlibFigure):
    """A matplotlib ``Figure`` that Jupyter displays as a PNG with no magic.

    Front ends show a cell's value through its ``_repr_png_``; a plain ``Figure`` made without
    ``pyplot`` has none unless ``%matplotlib inline`` registered one (then that one is used, and
    the figure still shows once).
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


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


FIGURE_SIGNATURE = "beyond-top1"  # in each file's metadata: replaced only if this tool wrote it


def save_figure(fig: Figure, path_without_suffix: str | Path) -> tuple[Path, Path]:
    """Write ``fig`` as ``<path>.png`` and ``<path>.svg`` atomically (parents created); return
    both paths. An existing file is replaced only if this toolkit wrote it."""
    base = Path(path_without_suffix)
    paths = (base.with_name(base.name + ".png"), base.with_name(base.name + ".svg"))
    for path, fmt, key in ((paths[0], "png", "Software"), (paths[1], "svg", "Creator")):

        def write(tmp: Path, fmt=fmt, key=key) -> None:
            fig.savefig(tmp, format=fmt, dpi=150, metadata={key: FIGURE_SIGNATURE})

        write_signed_file(path, write, FIGURE_SIGNATURE.encode())
    return paths


# ---------------------------------------------------------------------------------------------
# viz (issue 7): ordering statistics — rank correspondence, s_i histograms, scan comparison
# ---------------------------------------------------------------------------------------------


def _ordering_stats(items) -> dict[str, object]:
    """``{name: OrderingStats}`` from stats, scan results, or a dict of either."""
    if not isinstance(items, dict):
        items = {"": items}
    out = {}
    for name, item in items.items():
        if isinstance(item, OrderingStats):
            out[str(name)] = item
        elif hasattr(item, "ordering") and hasattr(item, "saturation"):  # a ScanResult
            out[str(name)] = item.ordering()
        else:
            raise TypeError(
                f"expected OrderingStats or ScanResult for {name!r}, got {type(item).__name__}"
            )
    if not out:
        raise ValueError("nothing to plot: pass at least one OrderingStats or ScanResult")
    return out


def _legend(ax: Axes, names) -> None:
    if any(names):
        ax.legend(fontsize=8)


def plot_rank_correspondence(stats) -> Figure:
    """Where ``s_j`` falls among each position's sorted saturation layers, per rank ``j`` (001).

    Left: mean place of ``s_j`` (1 = earliest) with the ideal ``place = j`` dashed; right: the
    fraction of positions where ``s_j`` is exactly in place. ``stats``: an ``OrderingStats``, a
    ``ScanResult`` or a ``{name: either}`` dict (grouped bars, e.g. trained vs. untrained).
    """
    stats = _ordering_stats(stats)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_place, ax_frac = fig.subplots(1, 2)
    width = 0.8 / len(stats)
    k_max = max(st.k for st in stats.values())
    for n, (name, st) in enumerate(stats.items()):
        table = st.rank_correspondence
        x = table["rank"].to_numpy() + (n - (len(stats) - 1) / 2) * width
        ax_place.bar(x, table["mean_place"], width, label=name or None)
        ax_frac.bar(x, table["frac_in_place"], width, label=name or None)
    ranks = np.arange(1, k_max + 1)
    ax_place.plot(ranks, ranks, "k--", lw=1, label="ideal order")
    ax_place.set_ylabel("mean place of s_j among sorted s")
    ax_frac.set_ylabel("fraction with s_j in place j")
    ax_frac.set_ylim(0, 1)
    for ax in (ax_place, ax_frac):
        ax.set_xticks(ranks)
        ax.set_xlabel("rank j")
        ax.grid(alpha=0.3, axis="y")
    ax_place.legend(fontsize=8)
    _legend(ax_frac, stats.keys())
    fig.suptitle("Rank correspondence (kept positions)")
    return fig


def _distribution(item) -> tuple[pd.DataFrame, int, str]:
    """``(rank, layer, count, fraction)`` frame, ``L`` and which positions it covers."""
    if isinstance(item, OrderingStats):
        label = f"{item.n_passing_filter} positions passing the filter"
        return item.distribution, item.n_layers, label
    if hasattr(item, "saturation_array") and hasattr(item, "n_layers"):  # a ScanResult
        s = item.saturation_array()
        return saturation_distribution(s, item.n_layers), item.n_layers, f"{len(s)} positions"
    raise TypeError(f"expected OrderingStats or ScanResult, got {type(item).__name__}")


def plot_saturation_histograms(items, *, relative: bool | None = None) -> Figure:
    """Histograms of ``s_i`` per rank ``i``: one panel per rank, fraction of positions per layer.

    ``items``: an ``OrderingStats`` (its filtered positions), a ``ScanResult`` (all its
    positions) or a ``{name: either}`` dict, drawn as overlaid steps (e.g. trained vs.
    untrained). ``relative`` puts layers on a 0..1 depth axis (``layer / (L-1)``); it defaults
    to on when the models' depths differ.
    """
    if not isinstance(items, dict):
        items = {"": items}
    dists = {str(name): _distribution(item) for name, item in items.items()}
    depths = {L for _, L, _ in dists.values()}
    relative = len(depths) > 1 if relative is None else relative
    k = int(max(frame["rank"].max() for frame, _, _ in dists.values()))
    cols = min(k, 5)
    rows = -(-k // cols)
    fig = Figure(figsize=(2.6 * cols + 0.6, 2.3 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True)).ravel()
    for i, ax in enumerate(axes):
        if i >= k:
            ax.set_visible(False)
            continue
        for name, (frame, L, what) in dists.items():
            part = frame[frame["rank"] == i + 1].sort_values("layer")
            x = part["layer"].to_numpy() / (L - 1 if relative else 1)
            label = f"{name} ({what})" if name else what
            if len(dists) == 1:
                ax.bar(x, part["fraction"], width=(1 / (L - 1) if relative else 1.0), label=label)
            else:
                ax.step(x, part["fraction"], where="mid", label=label)
        ax.set_title(f"s_{i + 1}", fontsize=10)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("fraction of positions")
        if i >= (rows - 1) * cols or i + cols >= k:
            ax.set_xlabel("layer / (L-1)" if relative else "layer")
    axes[0].legend(fontsize=7)
    fig.suptitle("Saturation layer per rank")
    return fig


def _p_label(st) -> str:
    """``n=…, p=…`` under a τ bar; a p of 0 is reported as below one permutation's share."""

    def fmt(p: float) -> str:
        return f"<{1 / st.n_permutations:.2g}" if p == 0 else f"={p:.3g}"

    return f"n={st.n_kept}\np(a){fmt(st.p_value_kept)}\np(b){fmt(st.p_value_all)}"


def _wrap_name(name: str | None) -> str:
    """A model name as a tick label: ``"untrained:gpt2-small"`` on two lines."""
    return (name or "scan").replace(":", ":\n")


def plot_ordering_comparison(stats) -> Figure:
    """Ordering statistics side by side for several scans (e.g. trained vs. untrained).

    Left: mean strict Kendall τ ± SE, with the within-position permutation null (mean ± 2 std,
    grey), and the number of kept positions and the p-value under each bar; middle: fraction
    of positions with strictly increasing ``s``; right: mean ``s_i / (L-1)`` per rank over the
    filtered positions. ``stats``: ``{name:
    OrderingStats or ScanResult}`` (or one of them).
    """
    stats = _ordering_stats(stats)
    names = list(stats)
    x = np.arange(len(names))
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax_tau, ax_frac, ax_mean = fig.subplots(1, 3)
    taus = [st.mean_tau for st in stats.values()]
    ses = [0.0 if np.isnan(st.tau_se) else st.tau_se for st in stats.values()]
    colors = [f"C{i}" for i in range(len(names))]
    ax_tau.bar(x, taus, 0.6, yerr=ses, color=colors, capsize=4, label="observed")
    for offset, convention, marker, label in (
        (-0.12, "kept", "s", "null (a) shuffle kept ranks ±2σ"),
        (0.12, "all", "v", "null (b) shuffle all k, re-drop ±2σ"),
    ):
        ax_tau.errorbar(
            x + offset,
            [getattr(st, f"null_{convention}_mean") for st in stats.values()],
            yerr=[2 * getattr(st, f"null_{convention}_std") for st in stats.values()],
            fmt=marker,
            color="grey",
            capsize=4,
            label=label,
        )
    ax_tau.axhline(0, color="k", lw=0.8)
    ax_tau.set_ylabel("mean strict Kendall τ")
    ax_tau.legend(fontsize=8, loc="best")
    ax_frac.bar(x, [st.frac_strictly_increasing for st in stats.values()], 0.6, color=colors)
    ax_frac.set_ylabel("fraction with s strictly increasing")
    ax_frac.set_ylim(0, 1)
    ax_frac.set_xticks(x, [_wrap_name(n) for n in names])
    ax_tau.set_xticks(x, [f"{_wrap_name(n)}\n{_p_label(st)}" for n, st in stats.items()])
    for ax in (ax_tau, ax_frac):
        ax.grid(alpha=0.3, axis="y")
    for color, (name, st) in zip(colors, stats.items(), strict=True):
        d = st.distribution
        totals = d.groupby("rank")["count"].sum()
        means = (d["layer"] * d["count"]).groupby(d["rank"]).sum() / totals.where(totals > 0)
        ax_mean.plot(
            means.index, means.to_numpy() / (st.n_layers - 1), "o-", color=color, label=name
        )
    ax_mean.set_xlabel("rank i")
    ax_mean.set_ylabel("mean s_i / (L-1)")
    ax_mean.set_ylim(0, 1)
    ax_mean.grid(alpha=0.3)
    _legend(ax_mean, names)
    fig.suptitle("Ordering of saturation events")
    return fig


__all__ = [
    "plot_lens_metric",
    "plot_lens_metrics",
    "plot_ordering_comparison",
    "plot_quality_of_fit",
    "plot_rank_correspondence",
    "plot_saturation_histograms",
    "save_figure",
]
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
    with ±1 SE bars, the strict rate, and the matched-donor and random-vector controls (both
    can succeed; see :mod:`beyond_top1.interventions`).

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
        for control, marker, style, text in (
            ("matched", "^", "-.", "matched donor (same top-1 at l, not final)"),
            ("random", "x", ":", "random same-layer state"),
        ):
            if f"{control}_success_rate" in frame.columns and frame[f"{control}_n"].sum() > 0:
                ax.plot(
                    frame["d"],
                    frame[f"{control}_success_rate"],
                    marker=marker,
                    linestyle=style,
                    color=color,
                    alpha=0.7,
                    label=f"control: {text}{name}",
                )
    ax.axvline(-0.5, color="black", linewidth=0.6, alpha=0.4)
    ax.set_xlabel("offset d (patched layer l = s₁(source) + d)")
    ax.set_ylabel("fraction of pairs")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax.figure


__all__ += ["plot_intervention_success", "plot_probe_per_layer"]
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
__all__ += ["Figure", "plot_heatmap", "plot_targets"]  # noqa: F822 - the last two load lazily


def __getattr__(name: str):
    """``plot_targets`` and ``plot_heatmap`` live in :mod:`beyond_top1.trajectory_figures`."""
    if name in ("plot_targets", "plot_heatmap"):
        from beyond_top1 import trajectory_figures

        return getattr(trajectory_figures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
