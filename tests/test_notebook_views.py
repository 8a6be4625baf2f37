"""The notebook experience: heatmap and diff views, the CircuitsVis bundle once per session with
its static stand-ins, figures that display as a cell's value, quiet progress bars and the
styled top-k table."""

from __future__ import annotations

import json
import re
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest

import beyond_top1 as bt
from beyond_top1 import viz
from beyond_top1.prompt import format_top_tokens
from beyond_top1.viz.fallback import static_html
from beyond_top1.viz.view import readable_token

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def traj(tiny_model):
    return bt.trajectory(tiny_model, PROMPT, k=4, targets=[" Rome", " Paris"])


class _Table(HTMLParser):
    """Rows of the heatmap table: ``[(row header, [(td attrs, text)])]``."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list = []
        self._in = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append(["", []])
        elif tag in ("td", "th") and self.rows:
            self._in = (tag, dict(attrs))
            if tag == "td":
                self.rows[-1][1].append([dict(attrs), ""])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in = None

    def handle_data(self, data):
        if self._in is None or not self.rows:
            return
        if self._in[0] == "th" and not self.rows[-1][1]:
            self.rows[-1][0] += data
        elif self._in[0] == "td":
            self.rows[-1][1][-1][1] += data


def _table(view: viz.View) -> list:
    page = view.html()
    table = re.search(r'<table class="bt-heat-table".*?</table>', page, flags=re.S).group(0)
    parser = _Table()
    parser.feed(table)
    return parser.rows[1:]  # the header row has no tds


def _background(attrs) -> tuple[int, ...]:
    return tuple(int(v) for v in re.search(r"rgb\((\d+),(\d+),(\d+)\)", attrs["style"]).groups())


def _data(view: viz.View) -> dict:
    text = re.search(r'<script type="application/json"[^>]*>(.*?)</script>', view.html(), re.S)
    return json.loads(text.group(1))


def test_heatmap_cells_are_the_top1_tokens_last_layer_on_top(traj):
    rows = _table(viz.heatmap(traj))
    L = traj.n_layers
    assert [int(header) for header, _ in rows] == list(range(L - 1, -1, -1))
    for header, cells in rows:
        layer = int(header)
        want = [readable_token(traj.vocab[int(i)], spaces=True) for i in traj.top_ids[:, layer, 0]]
        got = [text for _, text in cells]
        assert [w[:7] for w in want] == [g[:7] for g in got]  # cut to 8 characters with "…"


def test_heatmap_colour_follows_the_statistic(traj):
    prob = traj.stat("prob")  # [pos, L]
    rows = _table(viz.heatmap(traj, stat="prob"))
    darkness = np.array([[765 - sum(_background(a)) for a, _ in cells] for _, cells in rows])
    values = prob.T[::-1]  # rows are layers from the last down
    order = np.argsort(values.ravel(), kind="stable")
    assert (np.diff(darkness.ravel()[order]) >= 0).all()  # monotone in the probability
    ranks = traj.stat("rank: " + " Rome")
    rows = _table(viz.heatmap(traj, stat="rank:  Rome"))
    darkness = np.array([[765 - sum(_background(a)) for a, _ in cells] for _, cells in rows])
    order = np.argsort(ranks.T[::-1].ravel(), kind="stable")
    assert (np.diff(darkness.ravel()[order]) <= 0).all()  # rank 1 is the darkest


def test_heatmap_data_holds_every_lens_and_statistic(tiny_model, traj):
    other = bt.trajectory(tiny_model, PROMPT, k=4, targets=[" Rome", " Paris"], precision="bf16")
    view = viz.heatmap(traj, other, names=["first", "second"], stat="entropy")
    data = _data(view)
    assert [p["name"] for p in data["panels"]] == ["first", "second"]
    assert set(data["panels"][0]["values"]) == set(traj.stat_names)
    np.testing.assert_allclose(
        np.array(data["panels"][0]["values"]["kl"], dtype=float), traj.stat("kl").T, atol=0.006
    )
    top = np.array(data["panels"][1]["top"])  # [L, pos, k] indices into the strings
    strings = data["strings"]
    assert strings[top[-1, -1, 0]] == readable_token(
        other.vocab[int(other.top_ids[-1, -1, 0])], spaces=True
    )
    assert "selected>entropy</option>" in view.html()


def test_heatmap_errors(tiny_model, traj):
    with pytest.raises(ValueError, match="unknown statistic 'nope'"):
        viz.heatmap(traj, stat="nope")
    with pytest.raises(ValueError, match="same prompt"):
        viz.heatmap(traj, bt.trajectory(tiny_model, "Another prompt"))
    with pytest.raises(ValueError, match="same length"):
        viz.diff(traj, bt.trajectory(tiny_model, "Another prompt"))
    with pytest.raises(ValueError, match="at least one"):
        viz.heatmap()
    with pytest.raises(TypeError, match="batch_view"):
        viz.heatmap(bt.trajectory(tiny_model, [PROMPT, "Hello"]))


def test_diff_outlines_cells_whose_top1_changed(tiny_model, traj):
    from hooks import replace_at_positions

    ids, resid = bt.prompt.prompt_residuals(tiny_model, PROMPT)
    hook = ("blocks.0.hook_resid_post", replace_at_positions({len(ids) - 1: resid[2, 0]}))
    patched = bt.trajectory(tiny_model, PROMPT, k=4, targets=[" Rome", " Paris"], fwd_hooks=[hook])
    view = viz.diff(traj, patched, stat="logprob:  Rome", names=("clean", "patched"))
    rows = _table(view)
    outlined = sum("bt-changed" in (a.get("class") or "") for _, cells in rows for a, _ in cells)
    changed = int((traj.top_ids[:, :, 0] != patched.top_ids[:, :, 0]).sum())
    assert outlined == changed > 0
    # Only the patched position (the last) can change; its colour is the log-prob difference.
    last = [cells[-1] for _, cells in rows]
    delta = patched.stat("logprob:  Rome")[-1] - traj.stat("logprob:  Rome")[-1]
    assert np.abs(delta).max() > 0
    for (attrs, _), d in zip(last, delta[::-1], strict=True):
        r, g, b = _background(attrs)
        assert (b > r) if d > 1e-9 else (r > b) if d < -1e-9 else True
    batch = bt.trajectory(tiny_model, [PROMPT, PROMPT], k=4)
    assert re.search(r"\(0 of \d+\)", batch.diff(0, 1).html())  # itself: nothing changed


def test_each_copy_of_a_heatmap_gets_its_own_element_ids(traj):
    view = viz.heatmap(traj)
    page = (view + view).html()
    ids = re.findall(r'<div class="bt-heat" id="([^"]+)"', page)
    assert len(ids) == 2 and ids[0] != ids[1]
    assert view.body() != view.body()
    assert "<bt-uid>" not in page
    for uid in ids:  # every element the script looks up exists once
        for suffix in ("-controls", "-table", "-legend", "-data"):
            assert page.count(f'id="{uid}{suffix}"') == 1


def test_the_bundle_rides_with_the_first_inline_view_only(traj):
    first = traj._repr_html_()
    second = viz.topk_tokens(traj)._repr_html_()
    assert first.count("var CircuitsVis=") == 1
    assert "var CircuitsVis=" not in second and "CircuitsVis.render(" in second
    assert len(second) < len(first) - 1_000_000
    assert viz.topk_tokens(traj).html().count("var CircuitsVis=") == 1  # files stand alone
    viz.bundle_mode("every")
    assert viz.topk_tokens(traj)._repr_html_().count("var CircuitsVis=") == 1
    assert viz.topk_tokens(traj)._repr_html_().count("var CircuitsVis=") == 1
    viz.bundle_mode()  # keeps "every": the next views still carry it
    assert viz.topk_tokens(traj)._repr_html_().count("var CircuitsVis=") == 1
    assert viz.topk_tokens(traj)._repr_html_().count("var CircuitsVis=") == 1
    with pytest.raises(ValueError, match="mode must be one of"):
        viz.bundle_mode("sometimes")
    assert "var CircuitsVis=" not in viz.heatmap(traj)._repr_html_()  # needs no CircuitsVis


def test_every_component_carries_a_static_copy(traj):
    view = viz.trajectory_view(traj) + viz.token_log_probs(traj)
    page = view.html()
    for component in ("ColoredTokensMulti", "TopkTokens", "TokenLogProbs"):
        assert f'data-component="{component}"' in page
    assert page.count('class="bt-fallback"') == len(view.components)
    components = {p.name: p for p in view.parts if isinstance(p, viz.Component)}
    multi = components["ColoredTokensMulti"]
    static = static_html(multi.name, multi.props)
    assert static.count("<span") == traj.n_positions
    topk = components["TopkTokens"]
    static = static_html(topk.name, topk.props)
    assert static.count("<tr>") == traj.k + 1  # a header and one row per rank
    final_top1 = viz.view._cv_text(traj.vocab[int(traj.top_ids[0, -1, 0])], spaces=True)
    assert final_top1 in static
    assert "interactive only" in static_html("Hoverable", {})


def test_figures_show_as_a_cells_value(tiny_model, traj):
    fig = bt.plot.plot_targets(traj)
    png = fig._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ax_rank, ax_prob = fig.axes[:2]
    np.testing.assert_array_equal(ax_rank.lines[0].get_ydata(), traj.target_ranks[-1, :, 0])
    np.testing.assert_allclose(ax_prob.lines[1].get_ydata(), np.exp(traj.target_logprobs[-1, :, 1]))
    heat = bt.plot.plot_heatmap(traj, "kl", max_tokens=5)
    texts = {(t.get_position(), t.get_text()) for t in heat.axes[0].texts}
    top1 = readable_token(traj.vocab[int(traj.top_ids[-1, 0, 0])], spaces=True)[:7]
    assert ((4, 0), top1) in texts
    with pytest.raises(ValueError, match="no targets"):
        bt.plot.plot_targets(bt.trajectory(tiny_model, PROMPT))
    with pytest.raises(ValueError, match="no target is set at position -1"):
        bt.plot.plot_targets(bt.trajectory(tiny_model, PROMPT, targets="next"))
    one = bt.trajectory(tiny_model, PROMPT, targets=" Rome")
    rank_fig = bt.plot.plot_heatmap(one, "rank", max_tokens=5)  # the only target's rank
    assert rank_fig.axes[1].get_ylabel() == "-log10 rank:  Rome"
    with pytest.raises(TypeError, match="pick one"):
        bt.plot.plot_heatmap(bt.trajectory(tiny_model, [PROMPT, "Hello"]))


def test_progress_bars_are_text_without_ipywidgets_and_never_warn(monkeypatch):
    import sys

    from tqdm.std import tqdm as text_bar

    from beyond_top1 import progress

    progress._bar_class.cache_clear()
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # "import ipywidgets" now fails
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bar = progress.tqdm(total=3, disable=True)
            assert type(bar) is text_bar
            bar.close()
    finally:
        progress._bar_class.cache_clear()


def test_format_top_tokens_is_a_styled_table(tiny_model):
    frame = bt.top_tokens(tiny_model, PROMPT, k=3)
    styled = format_top_tokens(frame)
    page = styled.to_html()
    assert "<table" in page and "rgba(60, 110, 220" in page
    table = styled.data
    assert list(table.columns) == ["top-1", "top-2", "top-3"]
    assert len(table) == tiny_model.cfg.n_layers
    first = frame[(frame.layer == 0) & (frame["rank"] == 1)].iloc[0]
    assert table.loc[0, "top-1"] == f"{first.token!r} {first.prob:.2f}"
    with pytest.raises(ValueError, match="pick one prompt"):
        format_top_tokens(bt.top_tokens(tiny_model, [PROMPT, "Hello"], k=3))
