"""A :class:`View`: CircuitsVis components and HTML parts with the bundle inlined once.

Displays inline in Jupyter (``_repr_html_``) and saves to one self-contained, offline HTML file;
also the token-text helpers every renderer uses (see :mod:`beyond_top1.viz`).
"""

from __future__ import annotations

import html
import json
import math
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from beyond_top1.fileio import write_signed_file
from beyond_top1.viz.fallback import static_html

if TYPE_CHECKING:  # the prompt module renders through this one, not the reverse
    pass

DEFAULT_MAX_TOKENS = 200
# In a string part, replaced by a fresh element id on every View.body() call. It cannot occur in
# escaped text or in script JSON (both escape "<"), only where a renderer put it.
UID_MARK = "<bt-uid>"
GENERATOR_TAG = '<meta name="generator" content="beyond-top1">'  # marks pages this tool wrote
_LEGEND_INLINE = 24  # longer position keys are folded into a <details> element
_MARKERS = {"\n": "↵", "\t": "⇥", "\r": "␍"}
VIEW_STYLE = """<style>
.bt-view{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;color:#222}
.bt-view h3,.bt-view h4{margin:10px 0 4px 0}
.bt-caption{color:#555;font-size:12.5px;margin:2px 0 6px 0;max-width:70em}
.bt-note{background:#fff6d5;border-left:3px solid #e0b000;padding:3px 8px;font-size:12.5px}
.bt-legend{font-size:12px;color:#444;margin:4px 0;line-height:1.9}
.bt-legend code,.bt-grid code{background:#f2f2f2;padding:0 2px;border-radius:2px}
.bt-row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.bt-col{flex:1 1 480px;min-width:0;border-left:2px solid #ddd;padding-left:12px}
.bt-grid{border-collapse:collapse;font-size:12px;margin:6px 0}
.bt-grid td,.bt-grid th{border:1px solid #ddd;padding:1px 5px;white-space:nowrap}
.bt-grid td.bt-sat{font-weight:bold;box-shadow:inset 3px 0 0 #1a8f3a}
.bt-cv-error{color:#b00020;font-weight:bold}
.bt-fallback{margin:4px 0}
.bt-cv-missing{background:#fff6d5;border-left:3px solid #e0b000;padding:3px 8px;font-size:12.5px}
</style>"""


# ---------------------------------------------------------------------------------------------
# Token text
# ---------------------------------------------------------------------------------------------


def readable_token(token: str, *, spaces: bool = False, newlines: bool = False) -> str:
    """``token`` with visible whitespace: ``↵`` newline, ``⇥`` tab, ``␍`` CR, ``∅`` empty,
    ``\\xNN`` other control characters; ``␣`` for spaces when ``spaces`` (predicted tokens).

    With ``newlines`` a real newline follows each ``↵`` (running text keeps its line breaks).
    """
    if token == "":
        return "∅"
    out = []
    for ch in token:
        if ch in _MARKERS:
            out.append(_MARKERS[ch] + ("\n" if newlines and ch == "\n" else ""))
        elif ch == " " and spaces:
            out.append("␣")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _cv_text(token: str, **kwargs) -> str:
    """A token for CircuitsVis, which sets token text as innerHTML: readable, then escaped."""
    return html.escape(readable_token(token, **kwargs), quote=False)


def _code(token: str) -> str:
    return f"<code>{html.escape(readable_token(token, spaces=True))}</code>"


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One CircuitsVis component: its name in the bundle (``"ColoredTokens"``...) and props."""

    name: str
    props: dict


@lru_cache(maxsize=1)
def _bundle() -> str:
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"The CircuitsVis JavaScript bundle is missing ({path}); reinstall circuitsvis>=1.43 "
            "(its wheel ships dist/cdn/iife.js, which offline views need)."
        )
    js = path.read_text(encoding="utf-8")
    js = js.replace("</script", "<\\/script")  # occurs only inside JS strings
    lines = js.rstrip().splitlines()
    if lines and lines[-1].startswith("//# sourceMappingURL"):
        lines = lines[:-1]  # the map is not shipped inline; browsers would try to fetch it
    return "\n".join(lines)


def bundle_script() -> str:
    """``<script>`` defining the global ``CircuitsVis`` from the installed wheel's local bundle.

    Put it once on a page before any :meth:`View.body` (``View.html()`` / ``.save()`` do this).
    """
    return f"<script>\n{_bundle()}\n</script>"


def _js_json(value) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``<``, ``>``, ``&``; no NaN)."""
    text = json.dumps(_plain(value), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    return value


def _mount(component: Component) -> str:
    """The component's element, its static stand-in and the script that swaps one for the other.

    The stand-in (:mod:`beyond_top1.viz.fallback`) is what shows where scripts do not run; where
    they do and the ``CircuitsVis`` global is missing, it stays with a note saying how to get
    the interactive view back."""
    uid = "bt-cv-" + secrets.token_hex(6)
    name = component.name
    missing = (
        "Static copy: the CircuitsVis bundle is not on this page (it comes with the first view "
        "of a session). Run bt.views.bundle_mode() and re-run this cell."
    )
    return (
        f'<div class="bt-cv" id="{uid}" data-component="{name}"></div>\n'
        f'<div class="bt-fallback" id="{uid}-static">{static_html(name, component.props)}</div>\n'
        f"<script>(function(){{var el=document.getElementById({json.dumps(uid)});"
        f"var st=document.getElementById({json.dumps(uid + '-static')});"
        f'if(typeof CircuitsVis==="undefined"){{var n=document.createElement("div");'
        f'n.className="bt-cv-missing";n.textContent={json.dumps(missing)};el.appendChild(n);return;}}'
        f"try{{CircuitsVis.render({json.dumps(uid)},CircuitsVis.{name},"
        f"{_js_json(component.props)});if(st){{st.remove();}}}}"
        f'catch(e){{el.textContent="CircuitsVis could not render {name}: "+e;'
        f'el.className+=" bt-cv-error";}}}})();</script>'
    )


def _fresh_ids(part: str) -> str:
    return part.replace(UID_MARK, "bt-" + secrets.token_hex(6)) if UID_MARK in part else part


BUNDLE_MODES = ("once", "every")
# Colab shows every output in its own frame: a global defined by one output is not seen by the
# next, so there every view carries the bundle.
_SESSION = {"mode": "every" if "google.colab" in sys.modules else "once", "bundle_shown": False}


def bundle_mode(mode: str | None = None) -> None:
    """How inline views carry the ~1.3 MB CircuitsVis bundle in this Python session.

    ``"once"`` (the default; ``"every"`` in Google Colab, whose outputs do not share a page):
    the first view displayed carries it and later views use the global it defines, so a
    notebook holds it once. ``"every"``: each view carries its own copy (heavier, but every
    output stands alone). Saved files (``view.save``) always carry it. Any call (``mode=None``
    keeps the mode) makes the next view carry the bundle again, e.g. after clearing the output
    that had it.
    """
    if mode is not None and mode not in BUNDLE_MODES:
        raise ValueError(f"mode must be one of {BUNDLE_MODES}, got {mode!r}")
    _SESSION["mode"] = mode or _SESSION["mode"]
    _SESSION["bundle_shown"] = False


class View:
    """HTML made of raw snippets and CircuitsVis components; renders inline and saves offline.

    ``html()`` is a self-contained fragment (style + the local CircuitsVis bundle + body);
    ``save(path)`` writes it as a full HTML document. To put many views on one page with the
    bundle included once, use :func:`page`, or ``bundle_script()`` followed by each
    ``view.body()``.
    """

    def __init__(self, parts: Sequence[str | Component] = (), title: str = ""):
        self.parts: list[str | Component] = list(parts)
        self.title = title

    @property
    def components(self) -> list[str]:
        """Names of the CircuitsVis components in this view, in order."""
        return [p.name for p in self.parts if isinstance(p, Component)]

    def body(self) -> str:
        """The view's HTML without the bundle (fresh element ids on every call)."""
        out = [_fresh_ids(p) if isinstance(p, str) else _mount(p) for p in self.parts]
        return '<div class="bt-view">\n' + "\n".join(out) + "\n</div>"

    def html(self) -> str:
        """Self-contained HTML fragment: style, bundle (if there are components), body."""
        bundle = bundle_script() + "\n" if self.components else ""
        return VIEW_STYLE + "\n" + bundle + self.body()

    def _repr_html_(self) -> str:
        """Inline HTML: with the bundle on the session's first view only (see
        :func:`bundle_mode`)."""
        if not self.components:
            return VIEW_STYLE + "\n" + self.body()
        if _SESSION["mode"] == "every" or not _SESSION["bundle_shown"]:
            _SESSION["bundle_shown"] = True
            return self.html()
        return VIEW_STYLE + "\n" + self.body()

    def __html__(self) -> str:
        return self.html()

    def page(self) -> str:
        """A full HTML document."""
        title = html.escape(self.title or "beyond-top1")
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"{GENERATOR_TAG}\n<title>{title}</title>\n</head>\n<body>\n{self.html()}\n"
            "</body>\n</html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write :meth:`page` to ``path`` atomically (parents created); return the path. An
        existing file is replaced only if this toolkit wrote it."""
        data = self.page().encode("utf-8")
        return write_signed_file(path, lambda tmp: tmp.write_bytes(data), GENERATOR_TAG.encode())

    def __add__(self, other) -> View:
        other = as_view(other)
        return View(self.parts + other.parts, self.title or other.title)

    def __repr__(self) -> str:
        return f"View({self.title!r}, components={self.components})"


def as_view(item) -> View:
    """A :class:`View` from a view, a :class:`Trajectory` (its default view), a CircuitsVis
    ``RenderedHTML`` (its offline ``local_src``) or an HTML string."""
    if isinstance(item, View):
        return item
    if hasattr(item, "top_ids") and hasattr(item, "render"):  # a Trajectory: its default view
        return item.render()
    if hasattr(item, "local_src"):
        return View([item.local_src])
    if isinstance(item, str):
        return View([item])
    raise TypeError(f"cannot make a view from {type(item).__name__}")


def page(*items, title: str = "beyond-top1") -> View:
    """Several views (or trajectories, ``RenderedHTML``, HTML strings) on one page."""
    parts: list[str | Component] = [f"<h3>{html.escape(title)}</h3>"] if title else []
    for item in items:
        parts.extend(as_view(item).parts)
    return View(parts, title)


def side_by_side(*items, titles: Sequence[str] | None = None, title: str = "") -> View:
    """Views (or trajectories) in columns next to each other."""
    if len(items) < 2:
        raise ValueError("side_by_side needs at least two views")
    views = [as_view(item) for item in items]
    titles = list(titles) if titles is not None else [v.title for v in views]
    if len(titles) != len(views):
        raise ValueError(f"got {len(titles)} titles for {len(views)} views")
    parts: list[str | Component] = [f"<h3>{html.escape(title)}</h3>"] if title else []
    parts.append('<div class="bt-row">')
    for view, heading in zip(views, titles, strict=True):
        parts.append(f'<div class="bt-col"><h4>{html.escape(heading)}</h4>')
        parts.extend(view.parts)
        parts.append("</div>")
    parts.append("</div>")
    return View(parts, title or " | ".join(titles))
