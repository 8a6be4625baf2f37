"""What every task shares: the unavailable-on-this-data signal and figure saving."""

from __future__ import annotations

from pathlib import Path

from beyond_top1.figures import save_figure
from beyond_top1.fileio import OutputFolder


class AnalysisUnavailable(Exception):
    """An analysis cannot run on this data (too few positions for a probe, no pairs, ...): the
    message says why. ``reproduce`` records the stage as unavailable and goes on."""


def figure_path(out: str | Path, name: str) -> Path:
    """Where :func:`figure` put the PNG of figure ``name`` of a task's output folder."""
    return Path(out) / "figures" / f"{name}.png"


def figure(folder: OutputFolder | Path, fig, name: str) -> Path:
    """Save ``fig`` as ``<folder>/figures/<name>.png`` and ``.svg``; return the PNG's path."""
    base = folder.path if isinstance(folder, OutputFolder) else Path(folder)
    png, _ = save_figure(fig, base / "figures" / name)
    return png


__all__ = ["AnalysisUnavailable", "figure", "figure_path"]
