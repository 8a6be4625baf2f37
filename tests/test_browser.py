"""Saved views opened in real headless Chromium, offline (run: ``pytest -m browser``).

Chromium runs with its network closed (``tests/browser.py``: ``OFFLINE_FLAGS``). The tests read
the rendered DOM: each CircuitsVis mount point must hold the elements and the token text the
component draws (scripts excluded, so the props embedded in the page do not count), and a hover
must show the component's tooltip. A CDN page, which needs the network, is the negative control.
"""

from __future__ import annotations

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
