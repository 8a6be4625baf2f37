"""Task: 003's refinement gap against the position of the relevant document (stage
``refinement``; ``experiments/refinement_gap.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from beyond_top1.figures import plot_refinement_gap
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.lenses import Lens
from beyond_top1.refinement import (
    load_questions,
    make_questions,
    read_questions,
    refinement_table,
    save_questions,
)
from beyond_top1.tasks.common import AnalysisUnavailable, figure

KIND = "refinement"
QUESTIONS_FILE = "questions.jsonl"
ANSWERS_FILE = "answers.csv"
TABLE_FILE = "refinement.csv"


def figure_name(lens: str) -> str:
    return f"refinement_{lens}"


@dataclass(frozen=True)
class RefinementConfig:
    """``n_items`` base items per ``N`` in ``n_docs``, each at ``positions`` positions, from
    the Wikipedia ``split``; or the prompts of a saved ``questions`` file (``questions.jsonl``
    of an earlier run), which replace the generating fields."""

    n_items: int = 16
    n_docs: tuple[int, ...] = (5, 10, 20)
    positions: int | None = 5
    task: str = "kv"
    split: str = "val"
    questions: str | None = None
    batch_size: int = 8
    seed: int = 0


def run(
    model,
    config: RefinementConfig,
    out: str | Path | OutputFolder,
    lenses: Mapping[str, Lens],
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """Questions, answers per lens and the gap table; writes ``questions.jsonl``,
    ``answers.csv``, ``refinement.csv`` and one figure per lens. Returns the answers."""
    if config.questions:
        questions = load_questions(config.questions)
    else:
        questions = make_questions(
            model,
            n_docs=config.n_docs,
            n_items=config.n_items,
            positions=config.positions,
            task=config.task,
            split=config.split,
            seed=config.seed,
        )
    try:
        frame = read_questions(
            model, questions, lenses, batch_size=config.batch_size, progress=progress
        )
    except ValueError as exc:  # e.g. prompts longer than a small model's context
        raise AnalysisUnavailable(f"refinement gap: {exc}") from None
    table = refinement_table(frame)
    with output_folder(out, KIND) as folder:
        save_questions(questions, folder.claim(QUESTIONS_FILE))
        folder.write_csv(ANSWERS_FILE, frame)
        folder.write_csv(TABLE_FILE, table)
        for name in frame["lens"].unique():
            figure(folder, plot_refinement_gap(table, lens=name), figure_name(name))
    return frame


def load(out: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The answers and the gap table."""
    out = Path(out)
    return pd.read_csv(out / ANSWERS_FILE), pd.read_csv(out / TABLE_FILE)


def headline(answers: pd.DataFrame) -> dict:
    """Prompts, accuracy and the mean gap per lens over correct answers."""
    correct = answers[answers["correct"]]
    return {
        "n_prompts": int(answers["qid"].nunique()),
        "accuracy": float(answers.drop_duplicates("qid")["correct"].mean()),
        "mean_gap": {
            name: float(part["gap"].astype(float).mean()) for name, part in correct.groupby("lens")
        },
    }


__all__ = ["RefinementConfig", "headline", "load", "run"]
