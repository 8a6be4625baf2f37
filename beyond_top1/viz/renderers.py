"""Renderers: a :class:`~beyond_top1.prompt.Trajectory` as CircuitsVis views (see
:mod:`beyond_top1.viz`)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from beyond_top1.viz.view import (
    _LEGEND_INLINE,
    DEFAULT_MAX_TOKENS,
    Component,
    View,
    _code,
    _cv_text,
    readable_token,
    side_by_side,
)

if TYPE_CHECKING:  # the prompt module renders through this one, not the reverse
    from beyond_top1.prompt import Trajectory


# ---------------------------------------------------------------------------------------------
# Helpers for trajectories
# ---------------------------------------------------------------------------------------------


def _window(
    traj: Trajectory, window: tuple[int, int] | None, max_tokens: int
) -> tuple[int, int, str]:
    """``(start, stop, note)``: the positions to show; the note says what was left out."""
    n = traj.n_positions
    if window is None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        start, stop = max(0, n - max_tokens), n
        if start == 0:
            return 0, n, ""
        return (
            start,
            stop,
            f"Long text: showing the last {stop - start} of {n} tokens "
            f"(positions {start}..{n - 1}). Pass window=(start, stop) to choose others, "
            "or max_tokens= to show more.",
        )
    start, stop = (int(v) for v in window)
    if not 0 <= start < stop <= n:
        raise ValueError(f"window must satisfy 0 <= start < stop <= {n}, got {window}")
    if (start, stop) == (0, n):
        return 0, n, ""
    return start, stop, f"Showing positions {start}..{stop - 1} of {n} tokens."


def _note(text: str) -> list[str]:
    return [f'<div class="bt-note">{html.escape(text)}</div>'] if text else []


def _caption(text: str) -> str:
    return f'<div class="bt-caption">{text}</div>'


def _header(traj: Trajectory, lenses: str | None = None) -> str:
    s = traj.settings
    lenses = html.escape(traj.lens_name) + " lens" if lenses is None else lenses
    return (
        f"<h3>{html.escape(str(s.get('model_name', 'model')))} · {lenses} "
        f"· k={traj.k} · {traj.n_layers} layers · {traj.n_positions} tokens</h3>"
    )


def _prob(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"


def _position_legend(traj: Trajectory, start: int, stop: int) -> str:
    items = []
    for col, pos in enumerate(range(start, stop)):
        where = f"<b>{col}</b>" + (f" (pos {pos})" if start else "")
        items.append(f"{where} {_code(traj.tokens[pos])}")
    key = " · ".join(items)
    if len(items) <= _LEGEND_INLINE:
        return f'<div class="bt-legend">Position columns: {key}</div>'
    return (
        f'<details class="bt-legend"><summary>Position columns: key to the {len(items)} '
        f"columns</summary>{key}</details>"
    )


# ---------------------------------------------------------------------------------------------
# Renderers
# ---------------------------------------------------------------------------------------------


def _topk_sample(ids, values, layers, cv_strings) -> tuple[list, list, list]:
    """One ``TopkTokens`` sample: local token list, ``[layer][row][col]`` values and indices."""
    local, index = np.unique(ids, return_inverse=True)
    index = index.reshape(ids.shape)  # [cols, L, rows]
    rows = ids.shape[2]
    vals = [[values[:, l, r].tolist() for r in range(rows)] for l in layers]
    idxs = [[index[:, l, r].tolist() for r in range(rows)] for l in layers]
    return cv_strings(local), vals, idxs


def topk_tokens(
    traj: Trajectory | Sequence[Trajectory],
    *,
    window: tuple[int, int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    final_first: bool = True,
) -> View:
    """CircuitsVis ``TopkTokens`` with layers as the first dimension.

    For the chosen layer, a table whose columns are prompt positions and whose rows are ranks.
    Two samples per trajectory (the ``Sample`` menu):

    * ``top-k``: the lens' top-k next tokens at that layer, coloured by probability;
    * ``final top-k``: the final top-k tokens ``t_1..t_k``, coloured by ``1 / rank`` under the
      lens at that layer (1 = already top-1), so one sees where the eventual answers stand.

    Pass several trajectories of the same prompt (e.g. different lenses) to switch between them
    in the same menu. ``final_first`` lists the last layer first in the layer menu, so the view
    opens on the model's own prediction. Hover a cell for its value.
    """
    trajs = list(traj) if isinstance(traj, list | tuple) else [traj]
    if not trajs:
        raise ValueError("topk_tokens needs at least one trajectory")
    first = trajs[0]
    for other in trajs[1:]:
        if not np.array_equal(other.token_ids, first.token_ids):
            raise ValueError("all trajectories must be of the same prompt")
        if other.top_ids.shape != first.top_ids.shape:
            raise ValueError("all trajectories must have the same number of layers and k")
    start, stop, note = _window(first, window, max_tokens)
    L, k = first.n_layers, first.k
    layers = list(range(L - 1, -1, -1)) if final_first else list(range(L))
    props = {"tokens": [], "topkVals": [], "topkIdxs": [], "sampleLabels": []}
    for t in trajs:

        def strings(ids, t=t):
            return [_cv_text(s, spaces=True) for s in t.token_strings(ids)]

        probs = np.round(np.exp(t.top_logprobs[start:stop].astype(np.float64)), 4)
        final = np.broadcast_to(t.top_ids[start:stop, -1:, :], t.top_ids[start:stop].shape)
        reciprocal = np.round(1.0 / t.final_ranks[start:stop].astype(np.float64), 4)
        for label, ids, values in (
            (f"{t.lens_name} lens: top-{k} (value = probability)", t.top_ids[start:stop], probs),
            (f"{t.lens_name} lens: final top-{k} (value = 1/rank)", final, reciprocal),
        ):
            tokens, vals, idxs = _topk_sample(np.ascontiguousarray(ids), values, layers, strings)
            props["tokens"].append(tokens)
            props["topkVals"].append(vals)
            props["topkIdxs"].append(idxs)
            props["sampleLabels"].append(label)
    n_samples = len(props["tokens"])
    props["bottomkVals"] = [[[] for _ in layers] for _ in range(n_samples)]
    props["bottomkIdxs"] = [[[] for _ in layers] for _ in range(n_samples)]
    props["firstDimensionName"] = "Layer"
    props["thirdDimensionName"] = "Position"
    props["firstDimensionLabels"] = [f"{l} (final)" if l == L - 1 else str(l) for l in layers]
    lens_names = ", ".join(html.escape(t.lens_name) for t in trajs)
    caption = _caption(
        f"Top-{k} next tokens by layer ({lens_names} lens). Pick a sample and a layer; columns "
        f"are prompt positions (the prediction made after that token, see the key below), rows "
        f"are ranks 1..{k}. ‘top-{k}’ colours each token by its probability at that layer; "
        f"‘final top-{k}’ shows the final answers t<sub>1</sub>..t<sub>{k}</sub> coloured by "
        "1/rank at that layer. The ‘Position’ menu pages through columns; Filter ‘topk’ hides "
        "the (unused) bottom rows."
    )
    return View(
        [
            caption,
            *_note(note),
            _position_legend(first, start, stop),
            Component("TopkTokens", props),
        ],
        title=f"Top-{k} by layer ({lens_names} lens)",
    )


def colored_tokens(
    traj: Trajectory,
    rank: int = 1,
    *,
    window: tuple[int, int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> View:
    """CircuitsVis ``ColoredTokens``: each prompt token coloured by ``s_rank`` at its position
    (white = layer 0, blue = the last layer); hover shows the value."""
    if not 1 <= rank <= traj.k:
        raise ValueError(f"rank must be in 1..{traj.k}, got {rank}")
    start, stop, note = _window(traj, window, max_tokens)
    component = Component(
        "ColoredTokens",
        {
            "tokens": [_cv_text(t, newlines=True) for t in traj.tokens[start:stop]],
            "values": traj.s[start:stop, rank - 1].astype(float).tolist(),
            "minValue": 0.0,
            "maxValue": float(traj.n_layers - 1),
        },
    )
    caption = _caption(
        f"Tokens coloured by s<sub>{rank}</sub>: the layer from which the "
        f"{html.escape(traj.lens_name)} lens' rank-{rank} prediction after the token stays final "
        f"(white = layer 0, blue = layer {traj.n_layers - 1}). Hover for the value."
    )
    return View(
        [caption, *_note(note), component], title=f"s_{rank} per token ({traj.lens_name} lens)"
    )


def colored_tokens_multi(
    traj: Trajectory,
    *,
    window: tuple[int, int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> View:
    """CircuitsVis ``ColoredTokensMulti``: the prompt coloured by any of ``s_1..s_k`` (click or
    hover a label to switch); hovering a token lists all of its ``s_i``."""
    start, stop, note = _window(traj, window, max_tokens)
    k, L = traj.k, traj.n_layers
    component = Component(
        "ColoredTokensMulti",
        {
            "tokens": [_cv_text(t, newlines=True) for t in traj.tokens[start:stop]],
            "values": traj.s[start:stop].astype(float).tolist(),
            "labels": [f"s_{i}" for i in range(1, k + 1)],
            "positiveBounds": [float(L - 1)] * k,
        },
    )
    caption = _caption(
        f"Saturation layers s<sub>1</sub>..s<sub>{k}</sub> per token under the "
        f"{html.escape(traj.lens_name)} lens (layers 0..{L - 1}; the colour scale runs to "
        f"{L - 1} for every rank). Choose the rank above; hover a token for all of its values."
    )
    return View(
        [caption, *_note(note), component], title=f"s_1..s_{k} per token ({traj.lens_name} lens)"
    )


def token_log_probs(
    traj: Trajectory,
    *,
    window: tuple[int, int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> View:
    """CircuitsVis ``TokenLogProbs``: the model's final distribution at every position. Each
    token is coloured by the log-prob the model gave it; hover shows the final top-k and the
    token's rank."""
    start, stop, note = _window(traj, window, max_tokens)
    if stop - start < 2:
        raise ValueError("token_log_probs needs a window of at least two tokens")
    rows = range(start, stop - 1)  # predictions for tokens start+1 .. stop-1
    component = Component(
        "TokenLogProbs",
        {
            "prompt": [_cv_text(t, newlines=True) for t in traj.tokens[start:stop]],
            "topKLogProbs": np.round(traj.top_logprobs[rows, -1].astype(float), 4).tolist(),
            "topKTokens": [
                [_cv_text(t, spaces=True) for t in traj.token_strings(traj.top_ids[p, -1])]
                for p in rows
            ],
            "correctTokenRank": (traj.next_rank[rows] - 1).tolist(),
            "correctTokenLogProb": np.round(traj.next_logprob[rows].astype(float), 4).tolist(),
        },
    )
    caption = _caption(
        "The model's final distribution (its own logits): each token is coloured by the "
        "log-prob it was given (red = likely). Hover for the previous token → this token, the "
        f"top-{traj.k} predictions and this token's rank. CircuitsVis numbers ranks from #0 "
        "(#0 = rank 1)."
    )
    return View([caption, *_note(note), component], title="Final distribution and token ranks")


def topk_grid(traj: Trajectory, position: int = -1) -> View:
    """A static layers × ranks table of the top-k at one position (no JavaScript).

    Cells are coloured by probability; a bold, green-edged cell holds its final token at its
    rank from that layer on (``layer >= s_i``). Hover a cell for the probability.
    """
    p = traj.position(position)
    L, k = traj.n_layers, traj.k
    final = traj.top_ids[p, -1]
    s = traj.s[p]
    head = "".join(
        f"<th>rank {i + 1}<br>{_code(traj.vocab[int(final[i])])}<br>s<sub>{i + 1}</sub>"
        f" = {int(s[i])}</th>"
        for i in range(k)
    )
    rows = []
    for layer in range(L):
        cells = []
        for i in range(k):
            token_id = int(traj.top_ids[p, layer, i])
            prob = float(np.exp(traj.top_logprobs[p, layer, i]))
            shade = int(round(255 - 150 * min(max(prob, 0.0), 1.0)))
            saturated = layer >= s[i] and token_id == int(final[i])
            tip = html.escape(
                f"layer {layer}, rank {i + 1}: {traj.vocab[token_id]!r} p={prob:.4f}", quote=True
            )
            cls = ' class="bt-sat"' if saturated else ""
            cells.append(
                f'<td{cls} title="{tip}" style="background:rgb({shade},{shade},255)">'
                f"{html.escape(readable_token(traj.vocab[token_id], spaces=True))} "
                f"<small>{_prob(prob)}</small></td>"
            )
        rows.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    nxt = (
        f" (next token {_code(traj.tokens[p + 1])}, final rank {int(traj.next_rank[p])})"
        if p + 1 < traj.n_positions
        else ""
    )
    caption = _caption(
        f"Position {p}, after {_code(traj.tokens[p])}{nxt}: top-{k} per layer under the "
        f"{html.escape(traj.lens_name)} lens. Bold, green-edged cells hold their final token "
        "at that rank from that layer on."
    )
    table = f'<table class="bt-grid"><tr><th>layer</th>{head}</tr>{"".join(rows)}</table>'
    return View([caption, table], title=f"Top-{k} at position {p} ({traj.lens_name} lens)")


def trajectory_view(traj: Trajectory, position: int = -1, **window_kwargs) -> View:
    """The default view of a trajectory: ``s_1..s_k`` per token, the top-k table at
    ``position`` and the top-k by layer for every position."""
    parts = [_header(traj)]
    for view in (
        colored_tokens_multi(traj, **window_kwargs),
        topk_grid(traj, position),
        topk_tokens(traj, **window_kwargs),
    ):
        parts.append(f"<h4>{html.escape(view.title)}</h4>")
        parts.extend(view.parts)
    return View(parts, title=f"Trajectory ({traj.lens_name} lens)")


def compare_lenses(first: Trajectory, second: Trajectory, position: int = -1) -> View:
    """Two lenses on the same prompt, side by side: ``s_1`` per token, the top-k table at
    ``position`` and the top-k by layer, with a line of agreement statistics."""
    if not np.array_equal(first.token_ids, second.token_ids):
        raise ValueError("compare_lenses needs two trajectories of the same prompt and tokenizer")
    if first.top_ids.shape != second.top_ids.shape:
        raise ValueError(
            f"the trajectories differ in shape (layers, k): {first.top_ids.shape[1:]} vs "
            f"{second.top_ids.shape[1:]}"
        )
    top1_agree = float((first.top_ids[:, :, 0] == second.top_ids[:, :, 0]).mean())
    ds1 = second.s[:, 0].astype(float) - first.s[:, 0].astype(float)
    summary = _caption(
        f"Top-1 agreement over all (position, layer): {top1_agree:.1%}. Mean s<sub>1</sub>: "
        f"{first.s[:, 0].mean():.2f} ({html.escape(first.lens_name)}) vs "
        f"{second.s[:, 0].mean():.2f} ({html.escape(second.lens_name)}); mean difference "
        f"{ds1.mean():+.2f} layers."
    )
    columns = []
    for traj in (first, second):
        parts: list[str | Component] = []
        for view in (colored_tokens(traj, 1), topk_grid(traj, position), topk_tokens(traj)):
            parts.append(f"<h4>{html.escape(view.title)}</h4>")
            parts.extend(view.parts)
        columns.append(View(parts))
    names = [f"{first.lens_name} lens", f"{second.lens_name} lens"]
    if names[0] == names[1]:
        names = [f"{names[0]} (1)", f"{names[1]} (2)"]
    both = side_by_side(*columns, titles=names)
    header = _header(first, html.escape(f"{names[0]} vs. {names[1]}"))
    return View([header, summary, *both.parts], title=f"{names[0]} vs. {names[1]}")
