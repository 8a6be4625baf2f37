"""Saved views opened in real headless Chromium, offline (run: ``pytest -m browser``).

Chromium runs with its network closed (``tests/browser.py``: ``OFFLINE_FLAGS``). The tests read
the rendered DOM: each CircuitsVis mount point must hold the elements and the token text the
component draws (scripts excluded, so the props embedded in the page do not count), and a hover
must show the component's tooltip. A CDN page, which needs the network, is the negative control.
"""

from __future__ import annotations

import re

import browser
import numpy as np
import pytest

import beyond_top1 as bt
from beyond_top1 import viz
from beyond_top1.saturation import ORDERING_LABELS

pytestmark = pytest.mark.browser

PROMPT = "The capital of France is Paris.\nIt is <big> & old"


@pytest.fixture(scope="module")
def chromium():
    return browser.find_chromium()  # fails (not skips) when missing: CI must have it


@pytest.fixture(scope="module")
def traj(tiny_model):
    return bt.trajectory(tiny_model, PROMPT, k=4)


def _visible(token: str) -> str:
    """A prompt token as running text shows it (newline marker, no line break)."""
    return viz.readable_token(token).strip()


def _mounts(path) -> dict[str, list]:
    out: dict[str, list] = {}
    for mount in browser.mounted_components(browser.render_dom(path)):
        out.setdefault(mount.component, []).append(mount)
    return out


def test_trajectory_page_renders_every_component(chromium, traj, tmp_path):
    page = viz.page(traj, viz.token_log_probs(traj), viz.colored_tokens(traj), title="check")
    path = page.save(tmp_path / "trajectory.html")
    mounts = _mounts(path)
    assert set(mounts) == {"ColoredTokensMulti", "TopkTokens", "TokenLogProbs", "ColoredTokens"}
    for name, found in mounts.items():
        for mount in found:
            assert not mount.error, (name, mount.text)
            assert mount.n_elements >= traj.n_positions, (name, mount.n_elements)
    for name in ("ColoredTokens", "ColoredTokensMulti"):
        text = mounts[name][0].text
        for token in traj.tokens:
            assert _visible(token) in text, (name, token)
        assert "<big>" in text  # escaped markup shows as text
    # TokenLogProbs shows every token after the first.
    for token in traj.tokens[1:]:
        assert _visible(token) in mounts["TokenLogProbs"][0].text
    # TopkTokens: the table opens on the final layer; its first columns hold the final top-k.
    topk = mounts["TopkTokens"][0]
    assert topk.tags.get("table") == 1 and topk.tags.get("select", 0) >= 5
    shown = topk.text
    for pos in range(5):
        for token in traj.token_strings(traj.top_ids[pos, -1]):
            assert viz.readable_token(token, spaces=True) in shown, (pos, token)


def _hover(view: viz.View, selector: str, index: int, path) -> dict[str, list]:
    """Save ``view`` with a script that hovers the ``index``-th element matching ``selector``,
    then return the rendered mount points."""
    script = (
        "<script>setTimeout(function(){"
        f"var el=document.querySelectorAll({selector!r})[{index}];"
        "['mouseover','mouseenter','mousemove'].forEach(function(t){"
        "el.dispatchEvent(new MouseEvent(t,{bubbles:t!=='mouseenter',clientX:40,clientY:40}));"
        "});},300);</script>"
    )
    path.write_text(view.page().replace("</body>", script + "</body>"), encoding="utf-8")
    return _mounts(path)


def test_hover_shows_the_saturation_layer(chromium, traj, tmp_path):
    position = 3
    mounts = _hover(
        viz.colored_tokens(traj, rank=1),
        ".bt-cv .colored-tokens > span",
        position,
        tmp_path / "hover.html",
    )
    (mount,) = mounts["ColoredTokens"]
    assert mount.tags.get("strong") == 1  # the tooltip: token in bold, then the value
    expected = f"{_visible(traj.tokens[position])}{int(traj.s[position, 0])}"
    assert expected in mount.text.replace("\n", "").replace(" ", ""), mount.text


def test_hover_shows_the_final_rank_of_a_token(chromium, traj, tmp_path):
    shown = 4  # TokenLogProbs shows tokens 1..n-1; hover the 5th, i.e. position 5
    mounts = _hover(
        viz.token_log_probs(traj),
        ".bt-cv[data-component=TokenLogProbs] > div > span",
        shown,
        tmp_path / "hover_rank.html",
    )
    (mount,) = mounts["TokenLogProbs"]
    text = mount.text
    assert mount.tags.get("table") == 1, text
    position = shown + 1
    rank0 = int(traj.next_rank[position - 1]) - 1  # CircuitsVis numbers ranks from #0
    logprob = float(traj.next_logprob[position - 1])
    assert f"#{rank0}" in text and f"{logprob:.3f}" in text, text
    for token in traj.token_strings(traj.top_ids[position - 1, -1]):
        assert viz.readable_token(token, spaces=True) in text


def test_screenshot_shows_the_components(chromium, traj, tmp_path):
    from PIL import Image

    path = viz.trajectory_view(traj).save(tmp_path / "view.html")
    png = browser.screenshot(path, tmp_path / "view.png", window_size=(1200, 900))
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert image.shape[:2] == (900, 1200)
    # ColoredTokensMulti fills the late-saturating tokens with saturated blue.
    blue = (image[..., 2] > 200) & (image[..., 0] < 80) & (image[..., 1] < 80)
    assert blue.sum() > 500
    non_white = (image < 240).any(-1).mean()
    assert 0.02 < non_white < 0.9


def test_circuitsvis_local_src_renders_offline_but_cdn_does_not(chromium, tmp_path):
    """Negative control: the CDN version cannot load without the network, so it stays empty."""
    from circuitsvis.tokens import colored_tokens

    rendered = colored_tokens(["alpha", " beta"], [0.2, 0.8])
    local = viz.as_view(rendered).save(tmp_path / "local.html")
    cdn = tmp_path / "cdn.html"
    cdn.write_text(f"<!DOCTYPE html><html><body>{rendered.cdn_src}</body></html>")
    (ok,) = browser.mounted_components(browser.render_dom(local))
    assert "alpha" in ok.text and "beta" in ok.text and ok.n_elements >= 2
    (dead,) = browser.mounted_components(browser.render_dom(cdn))
    assert dead.n_elements == 0 and "alpha" not in dead.text


# ---------------------------------------------------------------------------------------------
# The reproduction report (beyond-top1 reproduce), built on tiny models
# ---------------------------------------------------------------------------------------------

_PROBE = """<script>window.addEventListener('load', function(){
var imgs=document.querySelectorAll('figure.bt-figure img'), ok=0;
imgs.forEach(function(i){ if(i.complete && i.naturalWidth>100 && i.naturalHeight>100) ok++; });
var b=document.body;
b.setAttribute('data-images', imgs.length);
b.setAttribute('data-images-ok', ok);
b.setAttribute('data-tables', document.querySelectorAll('table.bt-table').length);
});</script>"""


def _body_attrs(dom: str) -> dict[str, str]:
    import re

    match = re.search(r"<body([^>]*)>", dom)
    assert match, dom[:500]
    return dict(re.findall(r'(data-[\w-]+)="([^"]*)"', match.group(1)))


def test_report_renders_figures_tables_and_views_offline(chromium, tiny_reproduction, tmp_path):
    result, _, _ = tiny_reproduction
    page = result.report.read_text(encoding="utf-8")
    probed = tmp_path / "report.html"
    probed.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = browser.render_dom(probed, budget_ms=20_000, window_size=(1280, 4000))
    attrs = _body_attrs(dom)
    # every embedded figure decoded to a real image
    assert int(attrs["data-images"]) >= 8
    assert attrs["data-images-ok"] == attrs["data-images"], attrs
    assert int(attrs["data-tables"]) >= 10
    tau = ORDERING_LABELS["mean_tau"]  # the label every ordering table uses
    for heading in (tau, "balanced accuracy", "saved_at_95", "Package versions"):
        assert heading in dom, heading
    # every CircuitsVis view rendered from the bundle in the page (the network is closed)
    mounts = browser.mounted_components(dom)
    names = {m.component for m in mounts}
    assert {"ColoredTokens", "ColoredTokensMulti", "TopkTokens", "TokenLogProbs"} <= names
    for mount in mounts:
        assert not mount.error, (mount.component, mount.text)
        assert mount.n_elements >= 5, (mount.component, mount.n_elements)
    colored = next(m for m in mounts if m.component == "ColoredTokens")
    assert "capital" in colored.text and "Germany" in colored.text


def test_report_screenshot_is_not_blank(chromium, tiny_reproduction, tmp_path):
    from PIL import Image

    result, _, _ = tiny_reproduction
    png = browser.screenshot(result.report, tmp_path / "report.png", window_size=(1280, 2400))
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    non_white = (image < 235).any(-1).mean()
    assert 0.03 < non_white < 0.8, non_white
    # matplotlib's default blue and orange lines of the lens figures are on the first screen
    blue = (abs(image[..., 0] - 31) < 25) & (abs(image[..., 1] - 119) < 25) & (image[..., 2] > 160)
    assert blue.sum() > 200


# ---------------------------------------------------------------------------------------------
# Notebooks: the bundle once per session, reopened and untrusted notebooks, heatmap menus
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten_views(tmp_path_factory):
    """The ten-view notebook, executed, saved and read back from disk (as when reopened)."""
    import os

    import nbformat
    import notebook_runs

    folder = tmp_path_factory.mktemp("ten_views")
    saved = dict(os.environ)
    os.environ.update(notebook_runs.kernel_env(folder / "jupyter"))
    try:
        notebook = notebook_runs.execute(notebook_runs.ten_views_notebook(), folder)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    path = folder / "ten_views.ipynb"
    nbformat.write(notebook, path)
    return notebook, nbformat.read(path, as_version=4)


def _notebook_dom(notebook, path, **kwargs) -> str:
    import notebook_runs

    path.write_text(notebook_runs.outputs_page(notebook, **kwargs), encoding="utf-8")
    return browser.render_dom(path, budget_ms=15_000)


@pytest.mark.parametrize("which", ["fresh", "reopened"])
def test_ten_views_render_offline_fresh_and_reopened(chromium, ten_views, which, tmp_path):
    notebook = ten_views[0] if which == "fresh" else ten_views[1]
    dom = _notebook_dom(notebook, tmp_path / "page.html")
    mounts = browser.mounted_components(dom)
    assert len(mounts) == 8  # the CircuitsVis components of the ten views
    for mount in mounts:
        assert not mount.error and mount.n_elements >= 3, (mount.component, mount.text[:200])
    assert 'class="bt-fallback"' not in dom  # every static copy gave way to its component
    assert '<div class="bt-cv-missing">Static copy' not in dom
    heat_controls = re.findall(r'<div class="bt-heat-controls"[^>]*>', dom)
    assert len(heat_controls) >= 4  # heatmap, diff, a batch of two
    assert not any("display:none" in c or "display: none" in c for c in heat_controls)


def test_a_reopened_notebook_without_the_bundle_shows_static_copies(chromium, ten_views, tmp_path):
    dom = _notebook_dom(ten_views[1], tmp_path / "cleared.html", drop_bundle=True)
    mounts = browser.mounted_components(dom)
    assert mounts and not any(m.error for m in mounts)
    assert dom.count('class="bt-fallback"') == len(mounts)
    assert dom.count('<div class="bt-cv-missing">Static copy: the CircuitsVis') == len(mounts)
    assert dom.count('class="bt-heat-table"') >= 4  # the heatmaps need no bundle


def test_an_untrusted_notebook_shows_static_copies_and_tables(chromium, ten_views, tmp_path):
    dom = _notebook_dom(ten_views[1], tmp_path / "untrusted.html", trusted=False)
    mounts = browser.mounted_components(dom)
    assert mounts and all(m.n_elements == 0 for m in mounts)  # nothing ran
    assert dom.count('class="bt-fallback"') == len(mounts)
    tables = re.findall(r'<table class="bt-heat-table".*?</table>', dom, flags=re.S)
    assert len(tables) >= 4 and all(t.count("<td") >= 100 for t in tables)


def _cell_titles(dom: str) -> list[str]:
    """The ``title`` of every ``td`` of the first heatmap table, in order."""
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        titles: list[str] = []
        inside = 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table" and attrs.get("class") == "bt-heat-table":
                self.inside += 1
            elif tag == "td" and self.inside == 1:
                self.titles.append(attrs.get("title", ""))

        def handle_endtag(self, tag):
            if tag == "table" and self.inside:
                self.inside += 1  # past the first table

    parser = Cells()
    parser.titles = []
    parser.feed(dom)
    return parser.titles


def test_heatmap_menus_switch_lens_and_statistic(chromium, tiny_model, tmp_path):
    texts = [PROMPT, "Paris is a city in France.", "Rome is the capital of Italy."] * 3
    linear = bt.LinearShortcutLens.fit(tiny_model, texts, progress=False)
    first = bt.trajectory(tiny_model, PROMPT, k=4, targets=[" Rome"])
    second = bt.trajectory(tiny_model, PROMPT, lens=linear, k=4, targets=[" Rome"])
    view = viz.heatmap(first, second, names=["logit", "linear"], stat="prob")
    n_cells = first.n_positions * first.n_layers

    # On load: hover text on every cell, the first lens' top-k.
    loaded = browser.render_dom(view.save(tmp_path / "loaded.html"))
    titles = _cell_titles(loaded)
    assert len(titles) == n_cells and all(" | prob = " in t for t in titles)
    top1 = viz.readable_token(first.vocab[int(first.top_ids[-1, -1, 0])], spaces=True)
    assert titles[first.n_positions - 1].startswith(f"layer {first.n_layers - 1}, pos ")
    assert f": {top1} " in titles[first.n_positions - 1]

    # Switch to the second lens and to the target's rank.
    switch = (
        "<script>setTimeout(function(){var c=document.querySelector('.bt-heat-controls');"
        "var l=c.querySelector('[data-role=lens]');l.value='1';"
        "l.dispatchEvent(new Event('change'));"
        "var s=c.querySelector('[data-role=stat]');s.value='rank:  Rome';"
        "s.dispatchEvent(new Event('change'));},300);</script>"
    )
    path = tmp_path / "menus.html"
    path.write_text(view.page().replace("</body>", switch + "</body>"), encoding="utf-8")
    dom = browser.render_dom(path)
    legend = re.search(r'id="bt-[0-9a-f]+-legend">(.*?)</div>', dom).group(1)
    assert "rank:  Rome" in legend.replace("&nbsp;", " ") and "log scale" in legend
    cells = _cell_titles(dom)
    assert len(cells) == n_cells
    rank = int(second.target_ranks[-1, 0, 0])  # bottom row (layer 0), last column
    assert cells[-1].endswith(f"rank:  Rome = {rank}")
    lens2 = viz.readable_token(second.vocab[int(second.top_ids[-1, 0, 0])], spaces=True)
    assert cells[-1].startswith(f"layer 0, pos {first.n_positions - 1}: {lens2} ")
    assert not np.array_equal(first.top_ids[:, 0, 0], second.top_ids[:, 0, 0])
