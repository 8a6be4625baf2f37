"""Layer × position heatmaps of a per-cell statistic, with the lens' top-1 token as the cell text.

:func:`heatmap` draws one prompt under one or several lenses (logit, linear-shortcut, tuned...):
rows are layers (the last on top, as in the logit-lens posts), columns are positions, each cell
shows the lens' top-1 next token and is coloured by a statistic of
:meth:`~beyond_top1.prompt.Trajectory.stat`: the top-1 probability, the entropy, the KL to the
final layer, or a chosen target's rank, log-prob, probability or logit. Hover a cell for its
top-k. Menus switch the lens and the statistic.

The table is rendered in Python, so it shows without JavaScript (untrusted notebooks, GitHub);
a small script (no CircuitsVis, a few kB) adds the menus and the hover text. :func:`diff`
colours the difference between two runs of the same length (a patched and a clean run, or two
prompts) and marks cells whose top-1 differs; :func:`batch_view` shows a batch's prompts one
below the other.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from beyond_top1.viz.view import UID_MARK, View, _js_json, readable_token

if TYPE_CHECKING:
    from beyond_top1.prompt import Trajectory, TrajectoryBatch

DEFAULT_HEATMAP_TOKENS = 48  # columns shown by default: wider tables stop being readable
_CELL_CHARS = 8  # cell text is cut to this many characters (the tooltip has it whole)
HEATMAP_STYLE = """<style>
.bt-heat-table{border-collapse:collapse;font-size:11px;font-family:ui-monospace,monospace}
.bt-heat-table td{border:1px solid #eee;padding:1px 3px;white-space:pre;text-align:center;
min-width:2.5em;max-width:7em;overflow:hidden}
.bt-heat-table th{font-weight:normal;color:#555;padding:1px 4px;white-space:pre}
.bt-heat-table td.bt-changed{outline:2px solid #d4a000;outline-offset:-2px}
.bt-heat-controls select{margin:0 12px 4px 4px}
</style>"""


def _kind(stat: str) -> str:
    """How a statistic is coloured: ``prob`` (0..1), ``rank`` (log scale, 1 dark), ``nats``
    (0..max), ``signed`` (min..max)."""
    if stat == "prob" or stat.startswith("prob: "):
        return "prob"
    if stat.startswith("rank: "):
        return "rank"
    if stat in ("entropy", "kl"):
        return "nats"
    return "signed"


def _scale(values: np.ndarray, stat: str, vocab: int, diff: bool) -> tuple[float, float, str]:
    """``(low, high, kind)`` of the colour scale for ``values``."""
    finite = values[np.isfinite(values)]
    if diff:
        top = float(np.abs(finite).max()) if finite.size else 1.0
        return -max(top, 1e-12), max(top, 1e-12), "diff"
    kind = _kind(stat)
    if kind == "prob":
        return 0.0, 1.0, kind
    if kind == "rank":
        return 0.0, math.log10(vocab), kind
    if kind == "nats":
        return 0.0, float(finite.max()) if finite.size and finite.max() > 0 else 1.0, kind
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    return low, high if high > low else low + 1.0, kind


def _colour(value: float, low: float, high: float, kind: str) -> tuple[str, str]:
    """Background and text colour of one cell (the script has the same formulas)."""
    if value is None or not math.isfinite(value):
        return "#f4f4f4", "#999"
    if kind == "diff":  # blue = higher in the second run, red = lower
        t = max(-1.0, min(1.0, value / high))
        if t >= 0:
            rgb = (round(255 - 200 * t), round(255 - 140 * t), 255)
        else:
            rgb = (255, round(255 + 160 * t), round(255 + 190 * t))
        return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", "#fff" if abs(t) > 0.6 else "#222"
    x = math.log10(max(value, 1.0)) if kind == "rank" else value
    t = max(0.0, min(1.0, (x - low) / (high - low)))
    if kind == "rank":
        t = 1.0 - t  # rank 1 is the darkest
    rgb = (round(255 - 215 * t), round(255 - 160 * t), 255 - round(40 * t))
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", "#fff" if t > 0.6 else "#222"


def _cell_text(token: str) -> str:
    text = readable_token(token, spaces=True)
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…"


def _columns(traj: Trajectory, window, max_tokens: int) -> tuple[int, int, str]:
    from beyond_top1.viz.renderers import _window

    return _window(traj, window, max_tokens)


def _check_same_prompt(trajs: Sequence[Trajectory], what: str) -> None:
    first = trajs[0]
    for other in trajs[1:]:
        if not np.array_equal(other.token_ids, first.token_ids):
            raise ValueError(f"{what} needs trajectories of the same prompt (token ids differ)")
        if other.n_layers != first.n_layers:
            raise ValueError(f"{what} needs trajectories with the same number of layers")


def _significant(values: np.ndarray, digits: int = 4) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits (NaN and 0 stay)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(np.isfinite(values) & (values != 0), np.floor(np.log10(np.abs(values))), 0)
        factor = 10.0 ** (digits - 1 - scale)
        return np.where(np.isfinite(values), np.round(values * factor) / factor, values)


def _panel(name: str, traj: Trajectory, start: int, stop: int, stats, strings: dict) -> dict:
    """One run's data for the script: top-k as indices into the shared ``strings`` (added to
    as needed), their probabilities, and every statistic, ``[layer][col]``, rounded."""
    ids = traj.top_ids[start:stop].transpose(1, 0, 2)  # [L, cols, k]
    for i in np.unique(ids):
        strings.setdefault(int(i), len(strings))
    local = np.vectorize(lambda i: strings[int(i)], otypes=[np.int64])(ids)
    probs = np.round(np.exp(traj.top_logprobs[start:stop].transpose(1, 0, 2).astype(float)), 3)
    values = {
        s: traj.stat(s)[start:stop].T
        if _kind(s) == "rank"
        else _significant(traj.stat(s)[start:stop].T)
        for s in stats
    }  # ranks stay exact integers
    return {"name": name, "top": local, "p": probs, "values": values}


def _static_cells(traj: Trajectory, start: int, stop: int) -> list[list[str]]:
    """``[layer][col]`` cell texts of a run (the top-1 token), for the table rendered in Python."""
    return [
        [_cell_text(traj.vocab[int(i)]) for i in traj.top_ids[start:stop, layer, 0]]
        for layer in range(traj.n_layers)
    ]


def _changed(traj: Trajectory, base: Trajectory, start: int, stop: int) -> np.ndarray:
    """``[layer][col]``: whether the top-1 id differs between the runs."""
    return (traj.top_ids[start:stop, :, 0] != base.top_ids[start:stop, :, 0]).T


def _render(uid, traj, base, stat, vocab, start, stop, header) -> str:
    """The table of ``traj`` (minus ``base`` for a diff) coloured by ``stat``, in Python."""
    values = traj.stat(stat)[start:stop].T
    if base is not None:
        values = values - base.stat(stat)[start:stop].T
    low, high, kind = _scale(np.asarray(values, dtype=np.float64), stat, vocab, base is not None)
    cells = _static_cells(traj, start, stop)
    base_cells = _static_cells(base, start, stop) if base is not None else None
    changed = _changed(traj, base, start, stop) if base is not None else None
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for layer in range(traj.n_layers - 1, -1, -1):
        tds = []
        for col in range(stop - start):
            value = float(values[layer][col])
            bg, fg = _colour(value, low, high, kind)
            text = cells[layer][col]
            cls = ""
            if changed is not None and changed[layer][col]:
                cls, text = ' class="bt-changed"', f"{base_cells[layer][col]}→{text}"
            tds.append(f'<td{cls} style="background:{bg};color:{fg}">{html.escape(text)}</td>')
        rows.append(f"<tr><th>{layer}</th>{''.join(tds)}</tr>")
    table = (
        f'<table class="bt-heat-table" id="{uid}-table"><tr><th>layer</th>{head}</tr>'
        f"{''.join(rows)}</table>"
    )
    legend = (
        f'<div class="bt-caption" id="{uid}-legend">colour: {html.escape(stat)}'
        f"{' (second − first)' if base is not None else ''}, "
        f"{_legend_range(low, high, kind)}</div>"
    )
    return table + legend


def _legend_range(low: float, high: float, kind: str) -> str:
    if kind == "rank":
        return f"rank 1 (dark) to {10**high:.0f} (light), log scale"
    if kind == "diff":
        return f"red = lower by up to {high:.3g}, blue = higher by up to {high:.3g}"
    return f"{low:.3g} (light) to {high:.3g} (dark)"


_SCRIPT = """(function(){var uid=%(uid)s;var D=JSON.parse(document.getElementById(uid+"-data")
.textContent);var c=document.getElementById(uid+"-controls");c.style.display="";
var lens=c.querySelector("[data-role=lens]"),stat=c.querySelector("[data-role=stat]");
function esc(s){return String(s).replace(/&/g,"&amp;").replace(/</g,"&lt;")
.replace(/>/g,"&gt;").replace(/"/g,"&quot;");}
function cut(s){return s.length<=D.chars?s:s.slice(0,D.chars-1)+"\\u2026";}
function cell(P,l,j){return cut(D.strings[P.top[l][j][0]]);}
function tipOf(P,l,j){return"layer "+l+", pos "+(D.start+j)+": "+P.top[l][j].map(function(i,r){
return D.strings[i]+" "+(+P.p[l][j][r]).toFixed(3);}).join(", ");}
function colour(v,lo,hi,kind){if(v===null||!isFinite(v))return["#f4f4f4","#999"];var t;
if(kind==="diff"){t=Math.max(-1,Math.min(1,v/hi));var r=t>=0?[255-200*t,255-140*t,255]:
[255,255+160*t,255+190*t];return["rgb("+r.map(Math.round).join(",")+")",Math.abs(t)>0.6?
"#fff":"#222"];}var x=kind==="rank"?Math.log10(Math.max(v,1)):v;
t=Math.max(0,Math.min(1,(x-lo)/(hi-lo)));if(kind==="rank")t=1-t;return["rgb("+
[255-215*t,255-160*t,255-40*t].map(Math.round).join(",")+")",t>0.6?"#fff":"#222"];}
function scale(vals,s){var f=[];vals.forEach(function(r){r.forEach(function(v){
if(v!==null&&isFinite(v))f.push(v);});});var kind=D.kinds[s];
if(D.base){var m=f.reduce(function(a,v){return Math.max(a,Math.abs(v));},1e-12);
return[-m,m,"diff"];}if(kind==="prob")return[0,1,kind];if(kind==="rank")
return[0,Math.log10(D.vocab),kind];var lo=f.reduce(function(a,v){return Math.min(a,v);},
Infinity),hi=f.reduce(function(a,v){return Math.max(a,v);},-Infinity);if(!f.length){lo=0;hi=1;}
if(kind==="nats")return[0,hi>0?hi:1,kind];return[lo,hi>lo?hi:lo+1,kind];}
function draw(){var P=D.panels[+lens.value],s=stat.value,vals=P.values[s],B=D.base;
if(B){var bv=B.values[s];vals=vals.map(function(r,i){return r.map(function(v,j){
return v===null||bv[i][j]===null?null:v-bv[i][j];});});}
var sc=scale(vals,s),L=P.top.length,rows=[];var h="<tr><th>layer</th>"+D.header.map(
function(x){return"<th>"+esc(x)+"</th>";}).join("")+"</tr>";
for(var l=L-1;l>=0;l--){var tds=[];for(var j=0;j<P.top[l].length;j++){var v=vals[l][j];
var cl=colour(v,sc[0],sc[1],sc[2]),txt=cell(P,l,j),tip=tipOf(P,l,j)+" | "+s+" = "+
(v===null?"NaN":sc[2]==="rank"?String(Math.round(v)):(+v).toPrecision(4)),cls="";
if(B){if(D.changed[l][j]){cls=' class="bt-changed"';txt=cell(B,l,j)+"\\u2192"+txt;}
tip=tipOf(B,l,j)+" || "+tip;}
tds.push("<td"+cls+' style="background:'+cl[0]+";color:"+cl[1]+'" title="'+esc(tip)+'">'+
esc(txt)+"</td>");}rows.push("<tr><th>"+l+"</th>"+tds.join("")+"</tr>");}
document.getElementById(uid+"-table").innerHTML=h+rows.join("");
var lg=sc[2]==="rank"?"rank 1 (dark) to "+Math.round(Math.pow(10,sc[1]))+" (light), log scale"
:sc[2]==="diff"?"red = lower by up to "+(+sc[1]).toPrecision(3)+", blue = higher by up to "+
(+sc[1]).toPrecision(3):(+sc[0]).toPrecision(3)+" (light) to "+(+sc[1]).toPrecision(3)+
" (dark)";document.getElementById(uid+"-legend").textContent="colour: "+s+
(B?" (second \\u2212 first)":"")+", "+lg;}
lens.addEventListener("change",draw);stat.addEventListener("change",draw);draw();})();"""


def _options(items: Sequence[tuple[object, str]], chosen: str | None = None) -> str:
    return "".join(
        f'<option value="{html.escape(str(value), quote=True)}"'
        f"{' selected' if label == chosen else ''}>{html.escape(label)}</option>"
        for value, label in items
    )


def _heat_view(trajs, names, base, stats, stat, start, stop, header, title, caption) -> View:
    """The view: the first run's table in Python, the data and the script for the menus."""
    uid = UID_MARK  # View.body() puts a fresh id in its place on every call
    first = trajs[0]
    vocab = int(first.settings.get("d_vocab") or len(first.vocab))
    strings: dict[int, int] = {}
    panels = [_panel(n, t, start, stop, stats, strings) for n, t in zip(names, trajs, strict=True)]
    base_panel = None if base is None else _panel("base", base, start, stop, stats, strings)
    vocab_of = {**first.vocab, **(base.vocab if base is not None else {})}
    for t in trajs:
        vocab_of.update(t.vocab)
    ordered = sorted(strings, key=strings.get)
    data = {
        "panels": panels,
        "base": base_panel,
        "strings": [readable_token(vocab_of[i], spaces=True) for i in ordered],
        "header": header,
        "start": start,
        "chars": _CELL_CHARS,
        "vocab": vocab,
        "kinds": {s: _kind(s) for s in stats},
        "changed": None if base is None else _changed(first, base, start, stop),
    }
    what = "run" if base is not None else "lens"
    controls = (
        f'<div class="bt-heat-controls" id="{uid}-controls" style="display:none">{what}:'
        f'<select data-role="lens">{_options(list(enumerate(names)))}</select>statistic:'
        f'<select data-role="stat">{_options([(s, s) for s in stats], stat)}</select></div>'
    )
    body = _render(uid, first, base, stat, vocab, start, stop, header)
    part = (
        f'{HEATMAP_STYLE}\n<div class="bt-caption">{caption}</div>\n'
        f'<div class="bt-heat" id="{uid}">{controls}{body}</div>\n'
        f'<script type="application/json" id="{uid}-data">{_js_json(data)}</script>\n'
        f"<script>{_SCRIPT % {'uid': json.dumps(uid)}}</script>"
    )
    return View([part], title=title)


def _stat_name(traj: Trajectory, stat: str, stats: list[str]) -> str:
    """``stat`` as a menu name (``"rank"`` means the only target's rank)."""
    stat = traj.stat_name(stat)
    if stat not in stats:
        raise ValueError(f"unknown statistic {stat!r}; choose from {stats}")
    return stat


def _refuse_batches(items, what: str) -> None:
    if any(hasattr(item, "trajectories") for item in items):
        raise TypeError(
            f"{what} takes trajectories of one prompt; for a batch use batch.render() or "
            f"bt.views.batch_view(batch), or pick one: batch[0]"
        )


def _common_stats(trajs: Sequence[Trajectory]) -> list[str]:
    names = [n for n in trajs[0].stat_names if all(n in t.stat_names for t in trajs[1:])]
    return names


def heatmap(
    *trajs: Trajectory,
    stat: str = "prob",
    names: Sequence[str] | None = None,
    window: tuple[int, int] | None = None,
    max_tokens: int = DEFAULT_HEATMAP_TOKENS,
) -> View:
    """Layer × position heatmap of ``stat`` for one prompt under one or more lenses.

    Args:
        trajs: trajectories of the same prompt (e.g. ``bt.trajectory(model, p, lens=...)`` for
            the logit, linear and tuned lenses); a menu switches between them.
        stat: the colour, one of :attr:`Trajectory.stat_names` (``"prob"``, ``"entropy"``,
            ``"kl"``, ``"rank:  Rome"``...); a menu switches between those all trajectories
            have.
        names: a menu label per trajectory (default: each lens' name).
        window, max_tokens: which positions to show (default the last ``max_tokens``).
    """
    if not trajs:
        raise ValueError("heatmap needs at least one trajectory")
    _refuse_batches(trajs, "heatmap")
    _check_same_prompt(trajs, "heatmap")
    stats = _common_stats(trajs)
    stat = _stat_name(trajs[0], stat, stats)
    first = trajs[0]
    start, stop, note = _columns(first, window, max_tokens)
    names = list(names) if names is not None else [f"{t.lens_name} lens" for t in trajs]
    if len(names) != len(trajs):
        raise ValueError(f"got {len(names)} names for {len(trajs)} trajectories")
    header = [f"{p}\n{readable_token(first.tokens[p], spaces=True)}" for p in range(start, stop)]
    caption = (
        f"Top-1 next token at every layer (rows, last on top) and position (columns: the "
        f"prediction after that token), coloured by the chosen statistic. Hover a cell for its "
        f"top-{first.k}. {html.escape(note)}"
    )
    return _heat_view(
        trajs, names, None, stats, stat, start, stop, header, f"Heatmap: {stat}", caption
    )


def diff(
    first: Trajectory,
    second: Trajectory,
    *,
    stat: str = "prob",
    names: Sequence[str] = ("first", "second"),
    window: tuple[int, int] | None = None,
    max_tokens: int = DEFAULT_HEATMAP_TOKENS,
) -> View:
    """Heatmap of ``stat(second) - stat(first)``: cells show ``first→second`` where the top-1
    differs (outlined) and the shared top-1 otherwise.

    The two runs must have the same length and layers: a patched and a clean run of one prompt
    (``bt.trajectory(model, p, fwd_hooks=...)``), or two prompts of equal token length (clean and
    corrupted). ``names`` label the runs.
    """
    _refuse_batches((first, second), "diff")
    if first.n_positions != second.n_positions or first.n_layers != second.n_layers:
        raise ValueError(
            f"diff needs runs of the same length and layers, got {first.n_positions} and "
            f"{second.n_positions} tokens; use bt.views.side_by_side for prompts of different "
            "lengths"
        )
    stats = _common_stats([first, second])
    stat = _stat_name(first, stat, stats)
    start, stop, note = _columns(first, window, max_tokens)
    same = np.array_equal(first.token_ids, second.token_ids)
    header = []
    for p in range(start, stop):
        a = readable_token(first.tokens[p], spaces=True)
        b = readable_token(second.tokens[p], spaces=True)
        header.append(f"{p}\n{a}" if same or a == b else f"{p}\n{a}|{b}")
    changed = int((first.top_ids[start:stop, :, 0] != second.top_ids[start:stop, :, 0]).sum())
    caption = (
        f"{html.escape(names[1])} vs. {html.escape(names[0])}: colour = {html.escape(stat)} of "
        f"{html.escape(names[1])} minus {html.escape(names[0])}; outlined cells "
        f"({changed} of {(stop - start) * first.n_layers}) have a different top-1 "
        f"(shown as first→second). {html.escape(note)}"
    )
    return _heat_view(
        [second], [names[1]], first, stats, stat, start, stop, header, f"Diff: {stat}", caption
    )


def batch_view(batch: TrajectoryBatch, *, stat: str = "prob", **kwargs) -> View:
    """The heatmap of every prompt of ``batch``, one below the other (``kwargs`` as for
    :func:`heatmap`)."""
    parts: list = []
    for i, traj in enumerate(batch):
        parts.append(f"<h4>prompt {i}: {html.escape(traj.prompt[:120])}</h4>")
        parts.extend(heatmap(traj, stat=stat, **kwargs).parts)
    return View(parts, title=f"{len(batch)} prompts")


__all__ = ["DEFAULT_HEATMAP_TOKENS", "batch_view", "diff", "heatmap"]
