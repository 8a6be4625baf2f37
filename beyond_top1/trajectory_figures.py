"""Static figures of prompt trajectories: a chosen token's rank and probability across layers,
and the layer × position heatmap (the static twin of :func:`beyond_top1.viz.heatmap`).

Available as ``bt.plot.plot_targets`` and ``bt.plot.plot_heatmap``.
"""

from __future__ import annotations

import numpy as np

from beyond_top1.figures import Figure
from beyond_top1.viz.view import readable_token


def plot_targets(traj, position: int = -1) -> Figure:
    """Rank (log scale, 1 on top) and probability of every target at ``position``, per layer.

    ``traj``: a :class:`~beyond_top1.prompt.Trajectory` or a
    :class:`~beyond_top1.prompt.TrajectoryBatch` (one line per prompt and target) made with
    ``targets=...``.
    """
    trajs = list(traj) if hasattr(traj, "trajectories") else [traj]
    if not trajs[0].target_labels:
        raise ValueError("this trajectory has no targets: pass targets=[...] to bt.trajectory")
    if all((t.target_ids[t.position(position)] < 0).all() for t in trajs):
        raise ValueError(
            f"no target is set at position {position} (targets='next' has none at the last "
            "position): pass another position, e.g. position=-2"
        )
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_rank, ax_prob = fig.subplots(1, 2)
    layers = np.arange(trajs[0].n_layers)
    for i, t in enumerate(trajs):
        p = t.position(position)
        for c, label in enumerate(t.target_labels):
            if t.target_ids[p, c] < 0:
                continue
            name = repr(label) if len(trajs) == 1 else f"prompt {i}: {label!r}"
            ax_rank.plot(layers, t.target_ranks[p, :, c], marker=".", label=name)
            ax_prob.plot(layers, np.exp(t.target_logprobs[p, :, c]), marker=".", label=name)
    ax_rank.set_yscale("log")
    ax_rank.invert_yaxis()
    ax_rank.set(xlabel="layer", ylabel="rank (1 = top)", title="rank of each target")
    ax_prob.set(xlabel="layer", ylabel="probability", title="probability", ylim=(0, 1))
    ax_prob.legend(fontsize=8, loc="upper left")
    where = "" if len(trajs) > 1 else f" after {readable_token(trajs[0].tokens[p])!r}"
    fig.suptitle(f"{trajs[0].lens_name} lens, position {position}{where}", fontsize=10)
    return fig


def plot_heatmap(traj, stat: str = "prob", *, max_tokens: int = 24) -> Figure:
    """Layer × position heatmap of ``stat`` (a name from :attr:`Trajectory.stat_names`) with
    the top-1 token in each cell; the last ``max_tokens`` positions."""
    if hasattr(traj, "trajectories"):
        raise TypeError("plot_heatmap draws one prompt: pick one from the batch, e.g. batch[0]")
    stat = traj.stat_name(stat)
    values = traj.stat(stat)  # [pos, L]
    start = max(0, traj.n_positions - max_tokens)
    grid = values[start:].T  # [L, cols]
    L, cols = grid.shape
    fig = Figure(figsize=(1.0 + 0.62 * cols, 0.9 + 0.24 * L), layout="constrained")
    ax = fig.subplots()
    shown = grid
    cmap = "Blues"
    if stat.startswith("rank: "):
        shown = -np.log10(np.where(np.isfinite(grid), grid, np.nan))
        cmap = "Blues"
    image = ax.imshow(shown, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
    for layer in range(L):
        for col in range(cols):
            token = traj.vocab[int(traj.top_ids[start + col, layer, 0])]
            text = readable_token(token, spaces=True)[:7]
            dark = np.isfinite(shown[layer, col]) and (
                shown[layer, col] > np.nanmin(shown) + 0.6 * (np.nanmax(shown) - np.nanmin(shown))
            )
            ax.text(col, layer, text, ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(cols))
    ax.set_xticklabels(
        [f"{readable_token(traj.tokens[p])[:8]}" for p in range(start, traj.n_positions)],
        rotation=60,
        fontsize=7,
        ha="right",
    )
    ax.set_yticks(range(0, L, max(1, L // 10)))
    ax.set(xlabel="input token (prediction after it)", ylabel="layer")
    label = f"-log10 {stat}" if stat.startswith("rank: ") else stat
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    ax.set_title(f"top-1 token per layer and position, {traj.lens_name} lens", fontsize=10)
    return fig


__all__ = ["plot_heatmap", "plot_targets"]
