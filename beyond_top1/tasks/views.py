"""Task: per-token CircuitsVis views of a few prompts under each lens (stage ``views``), each
as an offline page and as a body for the report."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from beyond_top1 import viz
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.lenses import Lens
from beyond_top1.prompt import trajectory

KIND = "views"
INDEX_FILE = "views.json"


@dataclass(frozen=True)
class ViewsConfig:
    """The first prompt is shown under every lens (logit vs. linear side by side, and a
    layer × position heatmap with a lens menu); the second as per-token log-probs and
    saturation colours under the logit lens."""

    prompts: tuple[str, str]
    k: int = 5


@dataclass
class ViewsOutcome:
    """The views by key, and each lens' reading of the first prompt's last position."""

    views: dict[str, viz.View]
    last_position: dict[str, dict]


def run(
    model, config: ViewsConfig, out: str | Path | OutputFolder, lenses: Mapping[str, Lens]
) -> ViewsOutcome:
    """Writes ``<key>.html`` (standalone, offline), ``<key>.body.html`` and ``views.json``."""
    first = {
        name: trajectory(model, config.prompts[0], lens=lens, k=config.k)
        for name, lens in lenses.items()
    }
    views = {"trajectory_logit": viz.trajectory_view(first["logit"])}
    if "linear" in first:
        views["compare_logit_linear"] = viz.compare_lenses(first["logit"], first["linear"])
    names = [f"{name} lens" for name in first]
    views["heatmap_lenses"] = viz.heatmap(*first.values(), names=names)  # a lens menu
    second = trajectory(model, config.prompts[1], lens=lenses["logit"], k=config.k)
    views["token_log_probs"] = viz.token_log_probs(second)
    views["saturation_tokens"] = viz.colored_tokens_multi(second)
    with output_folder(out, KIND) as folder:
        index = []
        for key, view in views.items():
            view.save(folder.claim(f"{key}.html"))
            folder.write_text(f"{key}.body.html", view.body())
            index.append({"key": key, "title": view.title, "components": view.components})
        folder.write_json(INDEX_FILE, index)
    last = {
        name: {
            "final_top1": traj.vocab[int(traj.top_ids[-1, -1, 0])],
            "s_1_last_position": int(traj.s[-1, 0]),
        }
        for name, traj in first.items()
    }
    return ViewsOutcome(views, last)


def load(out: str | Path) -> list[dict]:
    """The index (``key``, ``title``, ``components``) with each view's ``body`` HTML."""
    out = Path(out)
    index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    for entry in index:
        entry["body"] = (out / f"{entry['key']}.body.html").read_text(encoding="utf-8")
    return index


def headline(outcome: ViewsOutcome, config: ViewsConfig) -> dict:
    return {"prompt": config.prompts[0], "last_position": outcome.last_position}


__all__ = ["ViewsConfig", "ViewsOutcome", "headline", "load", "run"]
