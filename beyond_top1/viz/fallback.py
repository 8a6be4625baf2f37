"""Static HTML stand-ins for CircuitsVis components: what a view shows where its JavaScript does
not run (an untrusted notebook, GitHub's notebook preview) or where the CircuitsVis bundle is not
on the page (a reopened notebook whose first view's output was cleared).

Each stand-in shows the component's default state without interaction: the tokens coloured by
their values, or the first sample's table. Token strings in the props are already escaped for
HTML (:func:`beyond_top1.viz.view._cv_text`).
"""

from __future__ import annotations

import html
import math


def _shade(value: float, low: float, high: float) -> str:
    """A white-to-blue background for ``value`` on ``[low, high]``."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or high <= low:
        return "#fff"
    t = min(max((value - low) / (high - low), 0.0), 1.0)
    return f"rgb({round(255 - 190 * t)},{round(255 - 130 * t)},255)"


def _tokens(tokens, values, low, high, titles) -> str:
    spans = [
        f'<span title="{html.escape(title, quote=True)}" '
        f'style="background:{_shade(v, low, high)};padding:0 1px">{token}</span>'
        for token, v, title in zip(tokens, values, titles, strict=True)
    ]
    return f'<div style="white-space:pre-wrap;line-height:1.8">{"".join(spans)}</div>'


def _colored_tokens(props) -> str:
    values = props["values"]
    titles = [f"{v}" for v in values]
    return _tokens(props["tokens"], values, props["minValue"], props["maxValue"], titles)


def _colored_tokens_multi(props) -> str:
    labels = props["labels"]
    first = [row[0] for row in props["values"]]
    titles = [
        ", ".join(f"{l}={v:g}" for l, v in zip(labels, row, strict=True)) for row in props["values"]
    ]
    return f"<div>{html.escape(labels[0])}:</div>" + _tokens(
        props["tokens"], first, 0.0, props["positiveBounds"][0], titles
    )


def _topk_tokens(props) -> str:
    tokens = props["tokens"][0]
    vals, idxs = props["topkVals"][0][0], props["topkIdxs"][0][0]  # sample 0, first layer
    layer = props["firstDimensionLabels"][0]
    rows = []
    for rank, (row_vals, row_idxs) in enumerate(zip(vals, idxs, strict=True), start=1):
        cells = "".join(
            f'<td style="background:{_shade(v, 0.0, 1.0)}" title="{v}">{tokens[i]}</td>'
            for v, i in zip(row_vals, row_idxs, strict=True)
        )
        rows.append(f"<tr><th>{rank}</th>{cells}</tr>")
    head = "".join(f"<th>{c}</th>" for c in range(len(vals[0]) if vals else 0))
    return (
        f"<div>{html.escape(props['sampleLabels'][0])}, layer {html.escape(str(layer))}</div>"
        f'<table class="bt-grid"><tr><th>rank</th>{head}</tr>{"".join(rows)}</table>'
    )


def _token_log_probs(props) -> str:
    tokens = props["prompt"]
    values = [None, *props["correctTokenLogProb"]]
    titles = [""] + [
        f"log-prob {lp}, rank {r + 1}; top: " + ", ".join(html.unescape(t) for t in top[:5])
        for lp, r, top in zip(
            props["correctTokenLogProb"],
            props["correctTokenRank"],
            props["topKTokens"],
            strict=True,
        )
    ]
    return _tokens(tokens, [-20.0 if v is None else v for v in values], -10.0, 0.0, titles)


_RENDERERS = {
    "ColoredTokens": _colored_tokens,
    "ColoredTokensMulti": _colored_tokens_multi,
    "TopkTokens": _topk_tokens,
    "TokenLogProbs": _token_log_probs,
}


def static_html(name: str, props: dict) -> str:
    """A static rendering of CircuitsVis component ``name`` with ``props`` (a notice for a
    component without one)."""
    renderer = _RENDERERS.get(name)
    if renderer is None:
        return f"<div>(CircuitsVis {html.escape(name)}: interactive only)</div>"
    return renderer(props)


__all__ = ["static_html"]
