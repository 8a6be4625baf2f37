"""Task: the real early-exit decoder on prompts, timed against full greedy decoding (CLI
``early-exit generate``, stage ``generation``)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from beyond_top1 import hooked
from beyond_top1.early_exit import (
    GenerationBenchmark,
    benchmark_early_exit,
    generate_early_exit,
    make_criterion,
)
from beyond_top1.fileio import OutputFolder, output_folder
from beyond_top1.lenses import Lens
from beyond_top1.runtime import threads
from beyond_top1.tasks.common import AnalysisUnavailable

KIND = "early-exit-generate"
SUMMARY_FILE = "generation.csv"
PER_PROMPT_FILE = "generation_per_prompt.csv"
EXAMPLE_FILE = "example.json"
HEADLINE_KEYS = ("speedup", "agreement", "same_prefix_agreement", "mean_layers")


@dataclass(frozen=True)
class GenerationConfig:
    """One criterion (a simulation ``method`` name at ``theta``) under the lens named ``lens``;
    ``threads``: torch threads while decoding (batch-1 decoding is many tiny ops: one thread is
    usually fastest); ``example``: also write both decodes of the first prompt as text."""

    prompts: tuple[str, ...]
    criterion: str = "margin"
    theta: float = 0.9
    lens: str = "logit"
    min_layer: int = 0
    n_avg: float | None = None
    new_tokens: int = 32
    threads: int | None = 1
    example: bool = True


def prompts_from_texts(texts: Sequence[str], n_words: int) -> list[str]:
    """The first ``n_words`` words of each text: generation prompts from a corpus."""
    return [" ".join(text.split()[:n_words]) for text in texts]


def describe_criterion(method: str, theta: float, lens: str) -> str:
    """A criterion in words, e.g. ``margin p1-p2 >= 0.9 under the linear lens``."""
    if method == "cosine":
        return f"cos(h_l, h_l-1) >= {theta:.4g} ({lens} lens)"
    if method == "margin":
        return f"margin p1-p2 >= {theta:.4g} under the {lens} lens"
    return f"{method} θ={theta:.4g} under the {lens} lens"


def choose_criterion(layers_saved: Sequence[Mapping], lens: str) -> tuple[str, float, str]:
    """Of ``margin`` and ``cosine`` under ``lens``, the one that saved more layers at 95%
    Precision@1 in a simulation (rows of its layers-saved table), at that θ; ``margin`` 0.9 if
    neither reached 95%. Returns ``(method, theta, where theta came from)``."""
    best = None
    for row in layers_saved:
        if row.get("lens") != lens or row.get("method") not in ("margin", "cosine"):
            continue
        saved, theta = row.get("saved_at_95"), row.get("theta_at_95")
        if saved is None or theta is None or math.isnan(saved) or math.isnan(theta):
            continue
        if best is None or saved > best[0]:
            best = (saved, row["method"], float(theta))
    if best is None:
        return "margin", 0.9, "default"
    return best[1], best[2], "simulation: fewest layers at >= 95% Precision@1"


def run(
    model,
    config: GenerationConfig,
    out: str | Path | OutputFolder,
    lenses: Mapping[str, Lens],
    *,
    probe=None,
) -> GenerationBenchmark:
    """Benchmark the criterion against full decoding on every prompt; writes
    ``generation.csv``, ``generation_per_prompt.csv`` and (``example``) ``example.json``."""
    if config.lens not in lenses:
        raise ValueError(f"lens {config.lens!r} is not loaded; have {sorted(lenses)}")
    if not config.prompts:
        raise ValueError("no prompts to decode")
    try:
        hooked.check_stepwise_decoding(model)
    except NotImplementedError as exc:
        raise AnalysisUnavailable(f"early-exit decoding: {exc}") from None
    lens = lenses[config.lens]
    criterion = make_criterion(
        config.criterion, config.theta, min_layer=config.min_layer, probe=probe, n_avg=config.n_avg
    )
    with output_folder(out, KIND) as folder:
        with threads(config.threads):
            bench = benchmark_early_exit(
                model,
                list(config.prompts),
                {f"early exit/{config.lens}": (criterion, lens)},
                max_new_tokens=config.new_tokens,
            )
            if config.example:
                folder.write_json(EXAMPLE_FILE, _example(model, config, criterion, lens))
        folder.write_csv(SUMMARY_FILE, bench.summary())
        folder.write_csv(PER_PROMPT_FILE, bench.per_prompt)
    return bench


def _example(model, config: GenerationConfig, criterion, lens) -> dict:
    prompt, n = config.prompts[0], config.new_tokens
    full = generate_early_exit(model, prompt, None, max_new_tokens=n, decode_text=True)
    early = generate_early_exit(
        model, prompt, criterion, lens=lens, max_new_tokens=n, decode_text=True
    )
    return {
        "prompt": prompt,
        "full_text": full.text,
        "early_exit_text": early.text,
        "tokens": list(hooked.token_strings(model, early.token_ids)),
        "layers_used": [int(x) for x in early.layers_used],
        "n_layers": early.n_layers,
    }


def load(out: str | Path) -> tuple[pd.DataFrame, dict | None]:
    """The summary table and (when written) the example decodes."""
    out = Path(out)
    example = out / EXAMPLE_FILE
    text = example.read_text(encoding="utf-8") if example.is_file() else None
    return pd.read_csv(out / SUMMARY_FILE), json.loads(text) if text else None


def headline(summary: pd.DataFrame | GenerationBenchmark) -> dict:
    """Prompts, tokens, speed-up, agreement and layers used of the (first) criterion."""
    if isinstance(summary, GenerationBenchmark):
        summary = summary.summary()
    row = summary.iloc[0]
    return {
        "prompts": int(row["prompts"]),
        "new_tokens": int(row["new_tokens"]),
        **{key: float(row[key]) for key in HEADLINE_KEYS},
        "fraction_layers_saved": float(row["fraction_layers_saved"]),
    }


__all__ = [
    "prompts_from_texts",
    "GenerationConfig",
    "choose_criterion",
    "describe_criterion",
    "headline",
    "load",
    "run",
]
