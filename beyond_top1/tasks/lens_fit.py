"""Task: fit a linear-shortcut or tuned lens and save it (CLI ``fit-lens``, stages ``lens-*``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from beyond_top1 import distributed
from beyond_top1.data import resolve_max_len
from beyond_top1.lenses import (
    Lens,
    LinearShortcutLens,
    TunedLens,
    check_lens_destination,
    load_lens,
)
from beyond_top1.lenses.least_squares import DEFAULT_RIDGE
from beyond_top1.tasks.texts import TextSpec

KINDS = ("linear", "tuned")


@dataclass(frozen=True)
class LensFitConfig:
    """How a lens is fitted. ``tuned``: ``max_steps`` Adam steps from ``init`` (see
    :class:`~beyond_top1.lenses.TunedLensTraining`); ``time_limit_s``/``clock`` bound them."""

    kind: str = "linear"
    texts: TextSpec = field(default_factory=lambda: TextSpec(split="train", stop=500))
    max_len: int | None = None
    batch_size: int = 8
    score_first: bool = False
    ridge: float = DEFAULT_RIDGE  # linear
    bias: bool = False  # linear
    init: str = "linear"  # tuned
    max_steps: int = 60  # tuned
    lr: float | None = None  # tuned (None: the training default)
    time_limit_s: float | None = None  # tuned
    clock: str = "wall"  # tuned
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def run(model, config: LensFitConfig, out: str | Path, *, progress: bool = True) -> Lens:
    """Fit the lens and save it to ``out`` (checked before the fit: a folder holding files the
    toolkit did not write is refused)."""
    check_lens_destination(out)
    where = distributed.ranks()
    texts = config.texts.load()
    if config.kind == "linear":
        lens = LinearShortcutLens.fit(
            model,
            texts,
            bias=config.bias,
            ridge=config.ridge,
            batch_size=config.batch_size,
            max_len=config.max_len,
            description=config.texts.describe(),
            progress=progress,
            score_first=config.score_first,
        )
    else:
        overrides = {"max_steps": config.max_steps, "seed": config.seed}
        overrides["score_first"] = config.score_first
        if config.lr is not None:
            overrides["lr"] = config.lr
        if config.time_limit_s is not None:
            overrides.update(time_limit_s=config.time_limit_s, clock=config.clock)
        overrides["max_len"] = resolve_max_len(model, config.max_len)
        lens = TunedLens.fit(
            model,
            texts,
            init=config.init,
            batch_size=config.batch_size,
            progress=progress,
            **overrides,
        )
    distributed.run_checked(lambda: lens.save(out) if where.is_main else None, where)
    return lens


def load(out: str | Path, model) -> Lens:
    return load_lens(out, model)


def headline(lens: Lens) -> dict:
    """Linear: texts and tokens fitted on; tuned: steps and the mean held-out KL of the kept
    checkpoints."""
    if isinstance(lens, LinearShortcutLens):
        return {"n_texts": lens.fit_settings["n_texts"], "n_tokens": lens.fit_settings["n_tokens"]}
    history = lens.training_history
    return {
        "steps": int(history["step"].max()),
        "heldout_kl": statistics.fmean(lens.training_settings["heldout_kl"]),
    }


__all__ = ["KINDS", "LensFitConfig", "headline", "load", "run"]
