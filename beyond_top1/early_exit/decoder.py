"""Greedy decoding with real token-level early exit (beyond 001/004's simulations).

:func:`generate_early_exit` decodes one sequence greedily, running the blocks one at a time on
the new token with TransformerLens' key/value cache. After each block ``l < L-1`` a criterion
looks at the new token's residual; when it fires, the blocks ``l+1..L-1`` are **not run** for
that token and the token is predicted by a lens read of layer ``l``.

**Skipped layers' key/value cache (CALM's state copying).** Later tokens attend to every earlier
position at every layer, so the skipped layers need keys and values for the exited token. We
copy the exit layer's hidden state forward, ``h_j := h_l`` for ``j > l``, and compute each
skipped block's keys and values from it: ``K_j, V_j = proj_j(ln1_j(h_l))`` (the K/V
projections only, no attention and no MLP; see :func:`beyond_top1.hooked.append_kv_from_resid`).
This is the propagation used by CALM (Schuster et al. 2022); it is ~6% of a SmolLM2 block's
FLOPs.

The prompt is run through all layers (its last position predicts the first new token with the
full model); every later token may exit. Criteria are callables ``criterion(state) -> bool`` on a
:class:`LayerState`; each is the simulation's method of the same name (``criterion.method``;
:func:`make_criterion` builds one from that name), so one vocabulary serves both.
A criterion that reads the lens (margin, 004's rule) pays for a full unembedding at every layer
it checks: ~8× a SmolLM2 block's FLOPs, about one TransformerLens block's time at batch 1
(measured). ``min_layer`` limits where it looks; cheap criteria (cosine, probe) cost ~nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.data import tokenize
from beyond_top1.early_exit.criteria import TAU_004
from beyond_top1.lenses import Lens, resolve_lens
from beyond_top1.probes import apply_probe

# ---------------------------------------------------------------------------------------------
# What a criterion sees
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerState:
    """The token being decoded, after block ``layer``.

    ``position`` is its index in the sequence (the simulation's ``pos``); ``resid`` is its
    ``resid_post`` at ``layer`` and ``prev_resid`` the layer before (the embedding at layer 0).
    ``logits`` reads ``resid`` through the lens (computed once, on first use).
    """

    layer: int
    position: int
    resid: Float[Tensor, " d_model"]
    prev_resid: Float[Tensor, " d_model"]
    lens: Lens
    _logits: Tensor | None = field(default=None, repr=False)

    @property
    def logits(self) -> Float[Tensor, " d_vocab"]:
        if self._logits is None:
            self._logits = self.lens(self.resid, self.layer)
        return self._logits

    def margin(self) -> float:
        """``p_1 - p_2`` under the lens."""
        logits = self.logits.float()
        top = logits.topk(2).values
        lse = torch.logsumexp(logits, dim=-1)
        return float((top[0] - lse).exp() - (top[1] - lse).exp())


Criterion = Callable[[LayerState], bool]


@dataclass
class NeverExit:
    """Never fires: decoding is full greedy decoding (still pays the per-layer call)."""

    method = "never"

    def __call__(self, state: LayerState) -> bool:
        return False


@dataclass
class MarginExit:
    """``p_1 - p_2 >= theta`` under the lens (CALM's softmax confidence), from ``min_layer``."""

    method = "margin"
    theta: float
    min_layer: int = 0

    def __call__(self, state: LayerState) -> bool:
        return state.layer >= self.min_layer and state.margin() >= self.theta


@dataclass
class Confidence004Exit:
    """004's rule: ``p_1 - p_2 > 0.9 λ + 0.1 exp(-τ t / N)`` (``t`` = the token's position)."""

    method = "confidence_004"
    lam: float
    n_avg: float
    tau: float = TAU_004
    min_layer: int = 0

    def threshold(self, position: int) -> float:
        return 0.9 * self.lam + 0.1 * math.exp(-self.tau * position / self.n_avg)

    def __call__(self, state: LayerState) -> bool:
        return state.layer >= self.min_layer and state.margin() > self.threshold(state.position)


@dataclass
class CosineExit:
    """``cos(h_l, h_{l-1}) >= theta`` (hidden-state saturation; no unembedding needed)."""

    method = "cosine"
    theta: float
    min_layer: int = 0

    def __call__(self, state: LayerState) -> bool:
        if state.layer < self.min_layer:
            return False
        cos = torch.nn.functional.cosine_similarity(
            state.resid.float(), state.prev_resid.float(), dim=-1
        )
        return float(cos) >= self.theta


@dataclass
class ProbeExit:
    """The task probe says the top-1 is settled (001): predicted task ``>= 2``, or, with
    ``theta``, its probability of task ``>= 2`` is ``>= theta``."""

    probe: object
    theta: float | None = None
    min_layer: int = 0

    def __call__(self, state: LayerState) -> bool:
        if state.layer < self.min_layer:
            return False
        tasks, settled = apply_probe(self.probe, state.resid[None, None])
        if self.theta is None:
            return int(tasks[0, 0]) >= 2
        if settled is None:
            raise ValueError("ProbeExit(theta=...) needs a probe with predict_proba and classes_")
        return float(settled[0, 0]) >= self.theta

    @property
    def method(self) -> str:
        return "probe" if self.theta is None else "probe_conf"


@dataclass
class FixedLayerExit:
    """Always exit after block ``layer``."""

    method = "fixed"
    layer: int

    def __call__(self, state: LayerState) -> bool:
        return state.layer >= self.layer


def make_criterion(
    method: str, theta: float, *, min_layer: int = 0, probe=None, n_avg: float | None = None
) -> Criterion:
    """The decoder's criterion for the simulation's ``method`` (``margin``, ``confidence_004``,
    ``cosine``, ``probe``, ``probe_conf``, ``fixed``) at threshold ``theta``."""
    if method == "margin":
        return MarginExit(theta, min_layer)
    if method == "confidence_004":
        if n_avg is None:
            raise ValueError("confidence_004 needs N (n_avg), the mean input length")
        return Confidence004Exit(theta, n_avg, min_layer=min_layer)
    if method == "cosine":
        return CosineExit(theta, min_layer)
    if method in ("probe", "probe_conf"):
        if probe is None:
            raise ValueError("the probe criteria need a probe")
        return ProbeExit(probe, theta if method == "probe_conf" else None, min_layer)
    if method == "fixed":
        return FixedLayerExit(int(theta))
    raise ValueError(
        f"unknown criterion {method!r}; choose from margin, confidence_004, cosine, probe, "
        "probe_conf, fixed"
    )


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One greedy decode: new token ids, the layer each exited at (``L-1``: no exit)."""

    prompt_ids: list[int]
    token_ids: list[int]
    exit_layers: list[int]
    n_layers: int
    seconds: float
    text: str | None = None

    @property
    def layers_used(self) -> Int[np.ndarray, " new"]:
        return np.asarray(self.exit_layers, dtype=np.int64) + 1

    @property
    def mean_layers(self) -> float:
        """Mean layers used over the tokens that could exit (all but the first)."""
        used = self.layers_used[1:]
        return float(used.mean()) if used.size else float(self.n_layers)


def _prompt_ids(model, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenize(model, prompt)
    ids = [int(i) for i in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
    if not ids:
        raise ValueError("the prompt has no tokens")
    return ids


def generate_early_exit(
    model,
    prompt: str | Sequence[int] | Int[Tensor, " pos"],
    criterion: Criterion | None = None,
    *,
    lens: Lens | None = None,
    max_new_tokens: int = 32,
    stop_at_eos: bool = False,
    decode_text: bool = False,
) -> Generation:
    """Greedy decoding that stops a token's forward pass when ``criterion`` fires.

    Args:
        prompt: text, or token ids (no BOS is added to ids).
        criterion: ``criterion(state) -> bool`` checked after blocks ``0..L-2`` of every new
            token but the first; ``None`` runs every layer without checking (full greedy).
        lens: reads an exited token's prediction (and the margin criteria's signal); default
            the logit lens.
        stop_at_eos: stop after the tokenizer's EOS token.

    Returns:
        :class:`Generation` with the new tokens, each one's exit layer and the wall-clock time
        (tokenization excluded).
    """
    hooked.check_stepwise_decoding(model)
    lens = resolve_lens(model, lens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    L = hooked.n_layers(model)
    ids = _prompt_ids(model, prompt)
    if len(ids) + max_new_tokens > hooked.n_ctx(model):
        raise ValueError(
            f"prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceed the context "
            f"of {hooked.n_ctx(model)}"
        )
    eos = None
    if stop_at_eos and model.tokenizer is not None:
        eos = model.tokenizer.eos_token_id
    device = hooked.model_device(model)
    new_ids: list[int] = []
    exits: list[int] = []
    start = time.perf_counter()
    with torch.inference_mode():
        cache = hooked.new_kv_cache(model)
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        resid, mask = hooked.embed_step(model, tokens, cache)
        for layer in range(L):
            resid = hooked.run_block(model, layer, resid, cache, mask)
        token = int(hooked.final_logits(model, resid[0, -1]).argmax())
        new_ids.append(token)
        exits.append(L - 1)
        while len(new_ids) < max_new_tokens and token != eos:
            position = hooked.cache_length(cache)
            tokens = torch.tensor([[token]], dtype=torch.long, device=device)
            resid, mask = hooked.embed_step(model, tokens, cache)
            exit_layer = L - 1
            for layer in range(L):
                out = hooked.run_block(model, layer, resid, cache, mask)
                if criterion is not None and layer < L - 1:
                    state = LayerState(layer, position, out[0, -1], resid[0, -1], lens)
                    if criterion(state):
                        exit_layer = layer
                        token = int(state.logits.argmax())
                        for skipped in range(layer + 1, L):
                            hooked.append_kv_from_resid(model, skipped, out, cache, mask)
                        break
                resid = out
            else:
                token = int(hooked.final_logits(model, resid[0, -1]).argmax())
            new_ids.append(token)
            exits.append(exit_layer)
    seconds = time.perf_counter() - start
    text = None
    if decode_text and model.tokenizer is not None:
        text = model.tokenizer.decode(new_ids)
    return Generation(ids, new_ids, exits, L, seconds, text)


def greedy_reference(model, prompt, max_new_tokens: int) -> list[int]:
    """Plain greedy decoding by full forward passes over the whole sequence (no cache): slow,
    obviously correct; the reference for tests."""
    ids = _prompt_ids(model, prompt)
    device = hooked.model_device(model)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            tokens = torch.tensor([ids + out], dtype=torch.long, device=device)
            logits = model(tokens, return_type="logits")
            out.append(int(logits[0, -1].argmax()))
    return out


# ---------------------------------------------------------------------------------------------
# Benchmark: speed-up and agreement against full greedy decoding
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationBenchmark:
    """Per-prompt timings and agreement of early-exit vs. full greedy decoding.

    ``per_prompt`` has one row per (prompt, criterion); :meth:`summary` one row per criterion.
    """

    per_prompt: pd.DataFrame
    n_layers: int
    settings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        rows = []
        for name, f in self.per_prompt.groupby("criterion", sort=False):
            tokens = int(f["n_tokens"].sum())
            eligible = int(f["n_eligible"].sum())
            layers = float((f["mean_layers"] * f["n_eligible"]).sum() / max(eligible, 1))
            rows.append(
                {
                    "criterion": name,
                    "description": self.settings.get("criteria", {}).get(name, ""),
                    "prompts": len(f),
                    "new_tokens": tokens,
                    "seconds_full": float(f["seconds_full"].sum()),
                    "seconds_early_exit": float(f["seconds_early_exit"].sum()),
                    "speedup": float(f["seconds_full"].sum() / f["seconds_early_exit"].sum()),
                    "tokens_per_s_full": tokens / float(f["seconds_full"].sum()),
                    "tokens_per_s_early_exit": tokens / float(f["seconds_early_exit"].sum()),
                    "agreement": float(f["agree"].sum() / tokens),
                    "same_prefix_agreement": float(f["same_prefix_agree"].sum() / max(eligible, 1)),
                    "exact_sequences": float(f["exact"].mean()),
                    "mean_tokens_before_divergence": float(f["tokens_before_divergence"].mean()),
                    "mean_layers": layers,
                    "fraction_layers_saved": 1.0 - layers / self.n_layers,
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        lines = [f"GenerationBenchmark (L={self.n_layers}):"]
        for row in self.summary().itertuples():
            lines.append(
                f"  {row.criterion}: {row.prompts} prompts × {row.new_tokens // row.prompts} "
                f"tokens, speed-up {row.speedup:.2f}×, agreement {row.agreement:.1%}, "
                f"same-prefix agreement {row.same_prefix_agreement:.1%}, "
                f"layers {row.mean_layers:.1f}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.summary().to_html(index=False)


def _same_prefix_agreement(model, generation: Generation) -> tuple[int, int]:
    """How many of the early-exit tokens (all but the first) the full model would also have
    produced after the same prefix: one full forward pass over the early-exit sequence."""
    ids = generation.prompt_ids + generation.token_ids
    device = hooked.model_device(model)
    with torch.inference_mode():
        logits = model(torch.tensor([ids[:-1]], device=device), return_type="logits")[0]
    start = len(generation.prompt_ids)
    full = logits[start - 1 :].argmax(-1).tolist()  # predictions for new tokens 0..n-1
    pairs = list(zip(full[1:], generation.token_ids[1:], strict=True))
    return sum(a == b for a, b in pairs), len(pairs)


def benchmark_early_exit(
    model,
    prompts: Sequence[str],
    criteria: Criterion | Mapping[str, Criterion | tuple[Criterion, Lens]],
    *,
    lens: Lens | None = None,
    max_new_tokens: int = 32,
    warmup: bool = True,
) -> GenerationBenchmark:
    """Time early-exit vs. full greedy decoding on every prompt and compare the tokens.

    ``criteria``: one criterion, or name -> criterion (or ``(criterion, lens)``); ``lens`` is
    the default lens. Per prompt, full decoding and every criterion run back to back with the
    same decoder code, in an order rotated from prompt to prompt to spread machine-load drift.
    Per (prompt, criterion): ``agree`` counts positions where both decodes have the same token;
    ``tokens_before_divergence`` the common prefix; ``same_prefix_agree`` the early-exit tokens
    the full model would also produce after the early-exit prefix (Precision@1 in real
    decoding).
    """
    default_lens = resolve_lens(model, lens)
    if not isinstance(criteria, Mapping):
        criteria = {"early_exit": criteria}
    runs = {
        name: entry if isinstance(entry, tuple) else (entry, default_lens)
        for name, entry in criteria.items()
    }
    if "full" in runs:
        raise ValueError("'full' is reserved for full greedy decoding; rename that criterion")
    if warmup and prompts:
        generate_early_exit(model, prompts[0], None, lens=default_lens, max_new_tokens=2)
        for criterion, crit_lens in runs.values():
            generate_early_exit(model, prompts[0], criterion, lens=crit_lens, max_new_tokens=2)
    names = ["full", *runs]
    rows = []
    for i, prompt in enumerate(prompts):
        shift = i % len(names)
        done = {}
        for name in names[shift:] + names[:shift]:
            criterion, crit_lens = (None, default_lens) if name == "full" else runs[name]
            done[name] = generate_early_exit(
                model, prompt, criterion, lens=crit_lens, max_new_tokens=max_new_tokens
            )
        full = done["full"]
        n = len(full.token_ids)
        for name in runs:
            ee = done[name]
            pairs = list(zip(full.token_ids, ee.token_ids, strict=True))
            same, eligible = _same_prefix_agreement(model, ee)
            rows.append(
                {
                    "criterion": name,
                    "prompt": i,
                    "prompt_tokens": len(full.prompt_ids),
                    "n_tokens": n,
                    "seconds_full": full.seconds,
                    "seconds_early_exit": ee.seconds,
                    "agree": sum(a == b for a, b in pairs),
                    "exact": full.token_ids == ee.token_ids,
                    "tokens_before_divergence": next(
                        (j for j, (a, b) in enumerate(pairs) if a != b), n
                    ),
                    "same_prefix_agree": same,
                    "n_eligible": eligible,
                    "mean_layers": ee.mean_layers,
                }
            )
    settings = {
        "criteria": {name: f"{c!r} / {l.kind} lens" for name, (c, l) in runs.items()},
        "max_new_tokens": max_new_tokens,
    }
    return GenerationBenchmark(pd.DataFrame(rows), hooked.n_layers(model), settings)


__all__ = [
    "Confidence004Exit",
    "CosineExit",
    "Criterion",
    "FixedLayerExit",
    "Generation",
    "GenerationBenchmark",
    "LayerState",
    "MarginExit",
    "NeverExit",
    "ProbeExit",
    "benchmark_early_exit",
    "generate_early_exit",
    "greedy_reference",
    "make_criterion",
]
