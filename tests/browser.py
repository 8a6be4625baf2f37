"""Open saved pages in headless Chromium, offline: the rendered DOM and a screenshot.

Used by the browser tests (``pytest -m browser``) to check that views and reports really render:
Chromium runs with ``--headless --no-sandbox --disable-gpu``, its own throw-away profile, and every
network path closed (a dead proxy, a host resolver that resolves nothing, background services
off), so a page that needs the network shows up as a page that did not render.

Chromium: Debian's ``chromium`` package (``scripts/setup.sh`` installs it when missing), or the
executable named by ``$BEYOND_TOP1_CHROMIUM``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_ENV = "BEYOND_TOP1_CHROMIUM"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--no-pings",
    "--hide-scrollbars",
    # Close the network: every request goes to a dead proxy and no host name resolves.
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


class BrowserUnavailable(RuntimeError):
    """No Chromium executable was found."""


def find_chromium() -> str:
    """Path of a Chromium executable (``$BEYOND_TOP1_CHROMIUM`` first)."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        if shutil.which(override) is None:
            raise BrowserUnavailable(f"${CHROMIUM_ENV}={override!r} is not an executable")
        return shutil.which(override)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserUnavailable(
        "Chromium is not installed. On Debian/Ubuntu: `apt-get install -y chromium` "
        f"(scripts/setup.sh does this when run as root), or set ${CHROMIUM_ENV} to a Chromium "
        "or Chrome executable."
    )


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="bt-chromium-") as profile:
        command = [find_chromium(), *OFFLINE_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def render_dom(
    path: str | Path, *, budget_ms: int = 10_000, window_size=(1280, 1000), timeout: float = 120
) -> str:
    """The DOM of ``path`` after its scripts ran (``--dump-dom``), offline."""
    url = Path(path).resolve().as_uri()
    result = _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={window_size[0]},{window_size[1]}",
            "--dump-dom",
            url,
        ],
        timeout,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(
            f"Chromium failed on {path} (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    return result.stdout


def screenshot(
    path: str | Path,
    png: str | Path,
    *,
    budget_ms: int = 10_000,
    window_size=(1280, 1000),
    timeout: float = 120,
) -> Path:
    """A PNG screenshot of ``path`` (the top ``window_size`` of the page), offline."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    url = Path(path).resolve().as_uri()
    result = _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={window_size[0]},{window_size[1]}",
            f"--screenshot={png}",
            url,
        ],
        timeout,
    )
    if not png.is_file():
        raise RuntimeError(
            f"Chromium wrote no screenshot of {path} (exit {result.returncode}): "
            f"{result.stderr[-2000:]}"
        )
    return png


# ---------------------------------------------------------------------------------------------
# Reading the rendered DOM
# ---------------------------------------------------------------------------------------------

_VOID = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
    "wbr",
}  # fmt: skip


@dataclass
class MountedComponent:
    """What a CircuitsVis mount point (``div.bt-cv``) holds after rendering."""

    id: str
    component: str
    error: bool
    n_elements: int = 0
    tags: dict = field(default_factory=dict)
    text: str = ""


class _MountParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.mounts: list[MountedComponent] = []
        self._depth = 0  # open elements inside the current mount (0: outside)
        self._skip = 0  # inside <script>/<style> within a mount
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self._depth == 0:
            classes = (attrs.get("class") or "").split()
            cv_id = (attrs.get("id") or "").startswith("circuits-vis-")  # CircuitsVis' own
            if tag == "div" and ("bt-cv" in classes or cv_id):
                self.mounts.append(
                    MountedComponent(
                        id=attrs.get("id", ""),
                        component=attrs.get("data-component", ""),
                        error="bt-cv-error" in classes,
                    )
                )
                self._depth, self._text = 1, []
            return
        mount = self.mounts[-1]
        if tag in ("script", "style"):
            self._skip += 1
        elif not self._skip:
            mount.n_elements += 1
            mount.tags[tag] = mount.tags.get(tag, 0) + 1
        if tag not in _VOID:
            self._depth += 1

    def handle_endtag(self, tag):
        if self._depth == 0 or tag in _VOID:
            return
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        self._depth -= 1
        if self._depth == 0:
            self.mounts[-1].text = "".join(self._text).replace("\xa0", " ")

    def handle_data(self, data):
        if self._depth and not self._skip:
            self._text.append(data)


def mounted_components(dom: str) -> list[MountedComponent]:
    """Every CircuitsVis mount point in a rendered DOM (``div.bt-cv`` of our views, or
    ``div#circuits-vis-*`` of CircuitsVis' own HTML), with the elements and visible text that
    rendering put into it (scripts and styles excluded)."""
    parser = _MountParser()
    parser.feed(dom)
    parser.close()
    return parser.mounts


__all__ = [
    "BrowserUnavailable",
    "MountedComponent",
    "OFFLINE_FLAGS",
    "find_chromium",
    "mounted_components",
    "render_dom",
    "screenshot",
]
