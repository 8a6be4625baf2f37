"""Top-k readouts through a lens: the per-batch kernel behind every scan.

:func:`lens_topk` reads residual streams at every layer through a lens and returns, per position
and layer, the lens' top-k token ids and log-probs and the rank of each of the final layer's
top-k tokens (rank = 1 + the number of vocabulary entries with a strictly higher logit). It holds
one layer's ``[tokens, vocab]`` logits at a time and never sorts the vocabulary.

Two precisions:

* ``"fp32"``: logits in fp32, ``torch.topk``; ranks and the log-normaliser come from one fused pass
  over the logits (``torch.compile``; an eager fallback gives the same numbers).
* ``"bf16"``: the unembedding matmul runs in bf16 (several times faster on CPUs with AMX or
  AVX512-BF16), then is *verified*. For every entry, a rigorous upper bound on the fp32 logit is
  formed from the bf16 logit and the rounding errors of its inputs (``‖x - bf16(x)‖·‖bf16(W_j)‖``
  + ``‖x‖·‖W_j - bf16(W_j)‖`` + accumulation and output rounding). The ``n_candidates`` entries
  with the largest bounds get their fp32 logits recomputed with the same GEMM as the fp32 path
  (bit-identical); if the largest bound outside them is below the recomputed k-th logit, no other
  token can be in the top-k, and the top-k ids and their order equal the fp32 path's. Rows where
  that check fails are recomputed in fp32 whole. Top-k ids and log-prob numerators, and hence
  saturation layers, are exact; ranks beyond ``k`` are counted on bf16 logits against exact
  thresholds and may be off by the few tokens within the bf16 error of the threshold; the
  log-normaliser is corrected with the exact candidate logits (error ≈ bf16 error × the
  probability mass outside the candidates).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import hooked

PRECISIONS = ("fp32", "bf16")
COMPILE_ENV = "BEYOND_TOP1_COMPILE"
DEFAULT_CANDIDATES = 32
_BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_FP32_UNIT = 2.0**-24


@dataclass
class TopKReadout:
    """Per position and layer: the lens' top-k and the ranks of the final top-k tokens.

    ``layers[j]`` is the layer of column ``j``; the last entry is always ``L-1``, whose top-k
    (``final_ids``) defines the final tokens whose ranks are tracked.
    """

    layers: tuple[int, ...]
    top_ids: Int[Tensor, "tokens layer k"]
    top_logprobs: Float[Tensor, "tokens layer k"]
    final_ranks: Int[Tensor, "tokens layer k"]
    n_exact_rows: int = 0  # bf16 path: (token, layer) rows settled by candidate recomputation
    n_fallback_rows: int = 0  # bf16 path: rows recomputed in fp32 whole

    @property
    def final_ids(self) -> Int[Tensor, "tokens k"]:
        return self.top_ids[:, -1]


# ---------------------------------------------------------------------------------------------
# Fused passes over [tokens, vocab] logits (compiled once, eager fallback)
# ---------------------------------------------------------------------------------------------


def _counts_and_lse_eager(
    logits: Float[Tensor, "tokens vocab"],
    bias: Float[Tensor, " vocab"],
    thresholds: Float[Tensor, "tokens k"],
) -> tuple[Int[Tensor, "tokens k"], Float[Tensor, " tokens"]]:
    """``#{v : logits[t, v] + bias[v] > thresholds[t, j]}`` and ``logsumexp_v(logits + bias)``."""
    x = logits.float() + bias
    counts = torch.stack(
        [
            (x > thresholds[:, j : j + 1]).sum(-1, dtype=torch.int32)
            for j in range(thresholds.shape[1])
        ],
        dim=-1,
    )
    return counts, torch.logsumexp(x, dim=-1)


def _counts_and_lse_fused(logits, bias, thresholds):
    x = logits.float() + bias
    counts = (x.unsqueeze(-1) > thresholds.unsqueeze(1)).sum(1, dtype=torch.int32)
    peak = x.amax(-1, keepdim=True)
    lse = peak.squeeze(-1) + (x - peak).exp().sum(-1).log()
    return counts, lse


def _upper_bounds_eager(
    logits16: Float[Tensor, "tokens vocab"],
    bias: Float[Tensor, " vocab"],
    row_input_error: Float[Tensor, " tokens"],
    row_norm: Float[Tensor, " tokens"],
    col_norm: Float[Tensor, " vocab"],
    col_error: Float[Tensor, " vocab"],
) -> Float[Tensor, "tokens vocab"]:
    """bf16 values that are ``>=`` the fp32 path's logits (see the module docstring)."""
    y = logits16.float()
    bound = (
        y
        + (_BF16_UNIT / (1 - _BF16_UNIT) * 1.01) * y.abs()
        + row_input_error.unsqueeze(-1) * col_norm
        + row_norm.unsqueeze(-1) * col_error
        + bias
        + 1e-6 * (y.abs() + bias.abs())
    )
    # Round to bf16 without going below the bound: pad by slightly more than one rounding.
    return (bound + (_BF16_UNIT * 1.02) * bound.abs()).to(torch.bfloat16)


_KERNELS: dict[str, object] = {}


_COMPILE_MIN_ELEMENTS = 1 << 24  # ~340 tokens x 49k vocab: below this, compiling costs more


def _kernel(name: str, n_elements: int | None = None):
    """The compiled kernel ``name`` for large inputs; its eager version for small ones, or when
    compiling is off (``BEYOND_TOP1_COMPILE=0``) or fails (no C++ compiler, ...).

    Compiling takes ~10-30 s once per process (less with a warm inductor cache), so one prompt
    in a notebook never pays it; a corpus scan does, once, and then reads each logit matrix once
    instead of ``k + 1`` times.
    """
    eager = {"counts_lse": _counts_and_lse_eager, "upper": _upper_bounds_eager}[name]
    if n_elements is not None and n_elements < _COMPILE_MIN_ELEMENTS:
        return eager
    if name in _KERNELS:
        return _KERNELS[name]
    fused = {"counts_lse": _counts_and_lse_fused, "upper": _upper_bounds_eager}[name]
    if os.environ.get(COMPILE_ENV, "1") == "0":
        _KERNELS[name] = eager
        return eager
    compiled = torch.compile(fused, dynamic=True)

    def run(*args):
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, unsupported platform, ...
            warnings.warn(
                f"torch.compile is unavailable ({type(exc).__name__}); using eager kernels, "
                f"which are slower. Set {COMPILE_ENV}=0 to silence this.",
                stacklevel=3,
            )
            _KERNELS[name] = eager
            return eager(*args)

    _KERNELS[name] = run
    return run


# ---------------------------------------------------------------------------------------------
# GEMMs that give bit-identical results for any subset of rows and columns
# ---------------------------------------------------------------------------------------------


def _logits(
    normed: Float[Tensor, "tokens d_model"],
    weight: Float[Tensor, "d_model vocab"],
    bias: Float[Tensor, " vocab"],
) -> Float[Tensor, "tokens vocab"]:
    """``normed @ weight + bias``, padding 1-row / 1-column products (BLAS uses gemv for those,
    whose rounding differs from gemm's), so any row or column subset reproduces the full GEMM."""
    rows, cols = normed.shape[0], weight.shape[1]
    if rows == 1:
        normed = normed.expand(2, -1)
    if cols == 1:
        weight, bias = weight.expand(-1, 2), bias.expand(2)
    out = normed @ weight + bias
    return out[:rows, :cols]


@dataclass
class _Unembedding:
    weight: Tensor  # [d_model, vocab], model dtype
    bias: Tensor  # [vocab]
    softcap: float = -1.0
    weight16: Tensor | None = None
    col_norm16: Tensor | None = None  # ‖bf16(W_j)‖, padded up
    col_error: Tensor | None = None  # ‖W_j - bf16(W_j)‖ + γ‖W_j‖, padded up

    @classmethod
    def of(cls, model, precision: str) -> _Unembedding:
        """Cached per (weights, version, precision): the bf16 copy and column norms of a
        ``[d_model, vocab]`` matrix cost more than a small batch's readout."""
        weight, bias = hooked.unembedding(model)
        key = (
            weight.data_ptr(),
            weight._version,
            bias.data_ptr(),
            bias._version,
            tuple(weight.shape),
            weight.dtype,
            precision,
        )
        cached = _UNEMBEDDING_CACHE.get(key)
        if cached is None or cached.weight is not weight and not torch.equal(cached.weight, weight):
            cached = cls.of_tensors(weight, bias, precision, hooked.logit_softcap(model))
            _UNEMBEDDING_CACHE.clear()  # hold one model's copies at most
            _UNEMBEDDING_CACHE[key] = cached
        return cached

    @classmethod
    def of_tensors(cls, weight, bias, precision: str, softcap: float = -1.0) -> _Unembedding:
        out = cls(weight, bias, softcap)
        if precision == "bf16":
            gamma = 1.01 * weight.shape[0] * _FP32_UNIT
            w16 = weight.to(torch.bfloat16)
            w16_f = w16.float()
            w_norm = weight.float().norm(dim=0)
            out.weight16 = w16
            out.col_norm16 = w16_f.norm(dim=0) * 1.001
            out.col_error = ((weight.float() - w16_f).norm(dim=0) + gamma * w_norm) * 1.001
        return out


_UNEMBEDDING_CACHE: dict[tuple, _Unembedding] = {}


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------


def _layer_fp32(unembedding: _Unembedding, normed: Tensor, k: int, final_ids: Tensor | None):
    logits = _logits(normed, unembedding.weight, unembedding.bias)
    if unembedding.softcap > 0:
        logits = unembedding.softcap * torch.tanh(logits / unembedding.softcap)
    values, ids = logits.topk(k, dim=-1)
    final = ids if final_ids is None else final_ids
    thresholds = logits.gather(-1, final).float()
    no_bias = torch.zeros((), dtype=torch.float32, device=logits.device)
    counts, lse = _kernel("counts_lse", logits.numel())(logits, no_bias, thresholds)
    return ids, values.float() - lse[:, None], counts + 1, 0


def _layer_bf16(
    unembedding: _Unembedding, normed: Tensor, k: int, final_ids: Tensor | None, n_candidates: int
):
    emb = unembedding
    tokens = normed.shape[0]
    d = normed.shape[1]
    gamma = 1.01 * d * _FP32_UNIT
    x16 = normed.to(torch.bfloat16)
    logits16 = x16 @ emb.weight16  # [T, V] bf16, accumulated in fp32
    x16_f = x16.float()
    row_input_error = ((normed.float() - x16_f).norm(dim=-1) + gamma * x16_f.norm(dim=-1)) * 1.001
    row_norm = normed.float().norm(dim=-1) * 1.001
    bias = emb.bias.float()
    upper = _kernel("upper", logits16.numel())(
        logits16, bias, row_input_error, row_norm, emb.col_norm16, emb.col_error
    )
    n_cand = min(max(n_candidates, k + 1), upper.shape[-1])
    bound_values, candidates = upper.topk(n_cand, dim=-1)
    del upper
    tracked = candidates if final_ids is None else torch.cat([candidates, final_ids], dim=-1)
    exact = _gathered_logits(normed, emb, tracked)  # fp32 path's values, bit-identical
    exact_cand = exact[:, :n_cand]
    values, where = exact_cand.topk(k, dim=-1)
    ids = candidates.gather(-1, where)
    outside = bound_values[:, -1].float()  # >= every non-candidate's fp32 logit
    if n_cand < emb.weight.shape[1]:
        settled = outside < values[:, -1]
    else:  # every entry is a candidate
        settled = torch.ones_like(outside, dtype=torch.bool)
    thresholds = exact[:, n_cand:] if final_ids is not None else values
    counts, lse16 = _kernel("counts_lse", logits16.numel())(logits16, bias, thresholds.float())
    # Replace the candidates' bf16 terms in the normaliser by their exact values.
    approx_cand = logits16.gather(-1, candidates).float() + bias[candidates]
    peak = lse16[:, None]
    mass = (
        1.0 - torch.exp(approx_cand - peak).sum(-1) + torch.exp(exact_cand.float() - peak).sum(-1)
    )
    lse = lse16 + torch.log(mass.clamp_min(torch.finfo(torch.float32).tiny))
    logprobs = values.float() - lse[:, None]
    final = ids if final_ids is None else final_ids
    ranks = counts + 1
    # Ranks within the exact top-k are exact: position in the top-k; others are at least k+1.
    in_top = final.unsqueeze(-1) == ids.unsqueeze(1)  # [T, k_final, k_top]
    top_rank = torch.where(in_top.any(-1), in_top.to(torch.int64).argmax(-1) + 1, 0)
    ranks = torch.where(top_rank > 0, top_rank.to(ranks.dtype), ranks.clamp_min(k + 1))
    n_fallback = int((~settled).sum())
    if n_fallback:
        rows = (~settled).nonzero().squeeze(-1)
        f_ids, f_logprobs, f_ranks, _ = _layer_fp32(
            emb, normed[rows], k, None if final_ids is None else final_ids[rows]
        )
        ids[rows], logprobs[rows], ranks[rows] = f_ids, f_logprobs, f_ranks
    return ids, logprobs, ranks, tokens - n_fallback


def _gathered_logits(normed: Tensor, emb: _Unembedding, ids: Int[Tensor, "tokens n"]) -> Tensor:
    """fp32 logits of the given ids per row, computed as a GEMM over the union of the ids'
    columns, so each value equals the full fp32 path's bit for bit."""
    union, inverse = torch.unique(ids, return_inverse=True)
    block = _logits(normed, emb.weight[:, union], emb.bias[union])  # [T, n_union]
    return block.gather(-1, inverse)


# ---------------------------------------------------------------------------------------------
# All layers
# ---------------------------------------------------------------------------------------------


def lens_topk(
    lens,
    resid: Float[Tensor, "tokens layer d_model"],
    layers: Sequence[int],
    k: int,
    *,
    precision: str = "fp32",
    n_candidates: int = DEFAULT_CANDIDATES,
) -> TopKReadout:
    """Top-k readouts of ``resid`` (column ``j`` at ``layers[j]``) through ``lens``.

    Args:
        lens: a :class:`~beyond_top1.lenses.Lens`.
        resid: residual streams; ``layers`` must end with the last layer ``L-1``.
        k: ranks to track (``1 <= k <= vocab``).
        precision: ``"fp32"`` or ``"bf16"`` (see the module docstring).
        n_candidates: bf16 path: entries per row recomputed in fp32.

    Returns:
        A :class:`TopKReadout` on the residual's device.
    """
    model = lens.model
    layers = tuple(int(l) for l in layers)
    last = hooked.n_layers(model) - 1
    vocab = hooked.d_vocab(model)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if not layers or layers[-1] != last:
        raise ValueError(f"layers must end with the last layer {last}, got {layers}")
    if resid.ndim != 3 or resid.shape[1] != len(layers):
        raise ValueError(
            f"resid must have shape [tokens, {len(layers)} layers, d_model], "
            f"got {tuple(resid.shape)}"
        )
    if precision == "bf16" and hooked.logit_softcap(model) > 0:
        warnings.warn("bf16 readout does not support logit soft-capping; using fp32", stacklevel=2)
        precision = "fp32"
    emb = _Unembedding.of(model, precision)
    tokens = resid.shape[0]
    shape = (tokens, len(layers), k)
    top_ids = torch.empty(shape, dtype=torch.int64, device=resid.device)
    top_logprobs = torch.empty(shape, dtype=torch.float32, device=resid.device)
    final_ranks = torch.empty(shape, dtype=torch.int64, device=resid.device)
    n_exact = n_fallback = 0
    final_ids = None
    with torch.inference_mode():
        for j in reversed(range(len(layers))):  # the last layer first: it defines the final top-k
            normed = hooked.final_norm(model, lens.transform(resid[:, j], layers[j]))
            if tokens == 0:
                continue
            if precision == "fp32":
                ids, logprobs, ranks, _ = _layer_fp32(emb, normed, k, final_ids)
            else:
                ids, logprobs, ranks, settled = _layer_bf16(emb, normed, k, final_ids, n_candidates)
                n_exact += settled
                n_fallback += tokens - settled
            top_ids[:, j], top_logprobs[:, j], final_ranks[:, j] = ids, logprobs, ranks
            if final_ids is None:
                final_ids = ids
    return TopKReadout(layers, top_ids, top_logprobs, final_ranks, n_exact, n_fallback)


__all__ = ["PRECISIONS", "TopKReadout", "lens_topk"]
