"""Renderers: the props they hand CircuitsVis, offline self-contained HTML, readable tokens."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import beyond_top1 as bt
from beyond_top1 import viz
from beyond_top1.viz import view as view_module

# Markup, an ampersand, a newline and a script end tag: what must survive into the page as text.
PROMPT = "Paris is <b>big</b> & old.\nIt is </script> the capital of France"


@pytest.fixture(scope="module")
def traj(tiny_model):
    return bt.trajectory(tiny_model, PROMPT, k=4)


@pytest.fixture(scope="module")
def long_traj(tiny_model):
    return bt.trajectory(tiny_model, " ".join(["the quick brown fox"] * 15), k=3)


def _components(view: viz.View) -> dict[str, viz.Component]:
    return {p.name: p for p in view.parts if isinstance(p, viz.Component)}


def _script_srcs(page: str) -> list[str]:
    return re.findall(r"<script\b[^>]*\bsrc\s*=", page, flags=re.I)


class _ScriptParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[str] = []
        self._inside = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._inside = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._inside = False

    def handle_data(self, data):
        if self._inside:
            self.scripts[-1] += data


def _scripts(page: str) -> list[str]:
    """The text of every <script> element, as a browser's tokenizer splits them."""
    parser = _ScriptParser()
    parser.feed(page)
    return [s.strip() for s in parser.scripts]


def _token_forms(token: str) -> set[str]:
    """How a prompt token can appear in a page: escaped HTML text, or inside props JSON."""
    forms = {html.escape(viz.readable_token(token, spaces=True))}
    for kwargs in ({"spaces": True}, {"newlines": True}):
        forms.add(view_module._js_json(view_module._cv_text(token, **kwargs))[1:-1])
    return forms


def _assert_offline(page: str) -> None:
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page
    assert not _script_srcs(page), "no <script src=...>: everything is inline"
    assert not re.search(r"import[^;]{0,200}from\s*[\"']https?://", page)
    assert "<link" not in page.lower()
    # No data broke out of a script element: the bundle, then one whole script per component.
    scripts = _scripts(page)
    n_components = page.count('class="bt-cv"')
    assert len(scripts) == (n_components + 1 if n_components else 0)
    if n_components:
        assert "var CircuitsVis=" in scripts[0]
        assert all(s.startswith("(function(){") and s.endswith("})();") for s in scripts[1:])


def test_readable_token():
    assert viz.readable_token("\n") == "↵"
    assert viz.readable_token("a\nb", newlines=True) == "a↵\nb"
    assert viz.readable_token(" the", spaces=True) == "␣the"
    assert viz.readable_token(" the") == " the"
    assert viz.readable_token("\t\r") == "⇥␍"
    assert viz.readable_token("") == "∅"
    assert viz.readable_token("\x00\x7f") == "\\x00\\x7f"
    assert view_module._cv_text("<b> &", spaces=True) == "&lt;b&gt;␣&amp;"


def test_topk_tokens_props(traj):
    view = viz.topk_tokens(traj)
    props = _components(view)["TopkTokens"].props
    L, k, n = traj.n_layers, traj.k, traj.n_positions
    assert props["firstDimensionName"] == "Layer"
    assert props["firstDimensionLabels"][0] == f"{L - 1} (final)"  # final layer first
    assert len(props["tokens"]) == 2  # top-k and final top-k samples
    for sample, (tokens, vals, idxs) in enumerate(
        zip(props["tokens"], props["topkVals"], props["topkIdxs"], strict=True)
    ):
        assert np.asarray(vals).shape == (L, k, n)
        for j, layer in enumerate(range(L - 1, -1, -1)):
            for pos in (0, n - 1):
                shown = [tokens[idxs[j][r][pos]] for r in range(k)]
                ids = traj.top_ids[pos, layer] if sample == 0 else traj.top_ids[pos, -1]
                want = [view_module._cv_text(t, spaces=True) for t in traj.token_strings(ids)]
                assert shown == want
                if sample == 0:
                    expect = np.exp(traj.top_logprobs[pos, layer])
                else:
                    expect = 1.0 / traj.final_ranks[pos, layer]
                got = [vals[j][r][pos] for r in range(k)]
                np.testing.assert_allclose(got, expect, atol=1e-4)
    # The key to the position columns names every prompt token.
    for token in traj.tokens:
        assert html.escape(viz.readable_token(token, spaces=True)) in view.html()


def test_colored_tokens_props(traj):
    for rank in (1, traj.k):
        props = _components(viz.colored_tokens(traj, rank))["ColoredTokens"].props
        assert props["values"] == traj.s[:, rank - 1].tolist()
        assert props["maxValue"] == traj.n_layers - 1
        assert props["tokens"] == [view_module._cv_text(t, newlines=True) for t in traj.tokens]
    with pytest.raises(ValueError, match="rank"):
        viz.colored_tokens(traj, traj.k + 1)
    props = _components(viz.colored_tokens_multi(traj))["ColoredTokensMulti"].props
    np.testing.assert_array_equal(props["values"], traj.s)
    assert props["labels"] == [f"s_{i}" for i in range(1, traj.k + 1)]


def test_token_log_probs_props(traj):
    props = _components(viz.token_log_probs(traj))["TokenLogProbs"].props
    n = traj.n_positions
    assert len(props["prompt"]) == n and len(props["correctTokenRank"]) == n - 1
    # CircuitsVis numbers ranks from 0.
    assert props["correctTokenRank"] == (traj.next_rank[:-1] - 1).tolist()
    np.testing.assert_allclose(props["correctTokenLogProb"], traj.next_logprob[:-1], atol=1e-4)
    np.testing.assert_allclose(props["topKLogProbs"], traj.top_logprobs[:-1, -1], atol=1e-4)


def test_every_view_is_offline_and_shows_the_tokens(traj, tmp_path):
    views = {
        "topk_tokens": viz.topk_tokens(traj),
        "colored_tokens": viz.colored_tokens(traj),
        "colored_tokens_multi": viz.colored_tokens_multi(traj),
        "token_log_probs": viz.token_log_probs(traj),
        "topk_grid": viz.topk_grid(traj),
        "trajectory_view": viz.trajectory_view(traj),
        "compare_lenses": viz.compare_lenses(traj, traj),
    }
    for name, view in views.items():
        page = view.save(tmp_path / f"{name}.html").read_text(encoding="utf-8")
        _assert_offline(page)
        assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
        if view.components:
            assert page.count("var CircuitsVis=") == 1, name  # the bundle, once
            for component in view.components:
                assert f"CircuitsVis.{component}," in page
        # Tokens reach the page as escaped text, never as markup.
        assert "<b>big" not in page and "</script> the" not in page
        if name != "topk_grid":
            for token in traj.tokens:
                assert any(form in page for form in _token_forms(token)), (name, token)
        assert view._repr_html_() != ""


def test_props_json_is_script_safe(traj):
    props = _components(viz.colored_tokens(traj))["ColoredTokens"].props
    text = view_module._js_json(props)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == view_module._plain(props)
    assert view_module._js_json({"x": float("nan")}) == '{"x": null}'


def test_long_text_is_windowed_with_a_note(long_traj):
    n = long_traj.n_positions
    view = viz.colored_tokens(long_traj, max_tokens=20)
    props = _components(view)["ColoredTokens"].props
    assert props["values"] == long_traj.s[n - 20 :, 0].tolist()
    assert f"showing the last 20 of {n} tokens" in view.html()
    view = viz.topk_tokens(long_traj, window=(5, 15))
    props = _components(view)["TopkTokens"].props
    assert np.asarray(props["topkVals"][0]).shape[-1] == 10
    assert f"Showing positions 5..14 of {n} tokens" in view.html()
    assert "(pos 5)" in view.html()
    full = viz.colored_tokens(long_traj, max_tokens=n)
    assert "bt-note" not in full.body()
    with pytest.raises(ValueError, match="window"):
        viz.colored_tokens(long_traj, window=(10, 5))


def test_pages_combine_views_with_one_bundle(traj):
    both = viz.side_by_side(viz.colored_tokens(traj), viz.topk_tokens(traj), titles=["a", "b"])
    assert both.components == ["ColoredTokens", "TopkTokens"]
    assert both.html().count("var CircuitsVis=") == 1
    assert (viz.colored_tokens(traj) + viz.token_log_probs(traj)).components == [
        "ColoredTokens",
        "TokenLogProbs",
    ]
    combined = viz.page(traj, viz.topk_grid(traj), title="report")
    assert combined.components == ["ColoredTokensMulti", "TopkTokens"]
    # Element ids are fresh on every render, so a view shown twice in a notebook works.
    ids = re.findall(r'id="(bt-cv-[0-9a-f]+)"', combined.body() + combined.body())
    assert len(ids) == len(set(ids)) == 4
    with pytest.raises(ValueError, match="two"):
        viz.side_by_side(viz.topk_grid(traj))


def test_circuitsvis_rendered_html_uses_local_src():
    from circuitsvis.tokens import colored_tokens

    rendered = colored_tokens(["a", "b"], [0.1, 0.9])
    page = viz.as_view(rendered).page()
    assert rendered.local_src in page and "unpkg.com" not in page


def test_repr_html_never_touches_the_network(traj, monkeypatch):
    """CircuitsVis' own _repr_html_ probes google.com; ours must not."""
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a view tried to reach the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert "CircuitsVis.TopkTokens" in viz.topk_tokens(traj)._repr_html_()


def test_compare_lenses_needs_the_same_prompt(tiny_model, traj):
    other = bt.trajectory(tiny_model, "Something else entirely", k=traj.k)
    with pytest.raises(ValueError, match="same prompt"):
        viz.compare_lenses(traj, other)
    view = viz.compare_lenses(traj, traj)
    assert "Top-1 agreement over all (position, layer): 100.0%" in view.html()


def test_topk_grid_marks_saturated_cells(traj):
    view = viz.topk_grid(traj, position=2)
    body = view.body()
    # Cells at or after s_i that hold the final token are marked; the last layer always is.
    expected = sum(
        int(
            sum(
                layer >= traj.s[2, i] and traj.top_ids[2, layer, i] == traj.top_ids[2, -1, i]
                for layer in range(traj.n_layers)
            )
        )
        for i in range(traj.k)
    )
    assert body.count('class="bt-sat"') == expected >= traj.k
