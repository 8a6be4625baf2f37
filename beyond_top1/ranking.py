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

import functools
import math
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
# One fused pass over [tokens, vocab] logits (compiled once for large inputs, eager otherwise)
# ---------------------------------------------------------------------------------------------

BLOCK = 64  # vocabulary entries per block of the block-max selection


def _block_max(scores: Float[Tensor, "tokens vocab"]) -> Float[Tensor, "tokens blocks"]:
    """Max of every ``BLOCK`` consecutive entries (the last block may be shorter)."""
    tokens, vocab = scores.shape
    full = vocab // BLOCK
    blocks = scores[:, : full * BLOCK].reshape(tokens, full, BLOCK).amax(-1)
    if vocab > full * BLOCK:
        blocks = torch.cat([blocks, scores[:, full * BLOCK :].amax(-1, keepdim=True)], dim=-1)
    return blocks


def _lse(x: Float[Tensor, "tokens vocab"]) -> Float[Tensor, " tokens"]:
    peak = x.amax(-1, keepdim=True)
    return peak.squeeze(-1) + (x - peak).exp().sum(-1).log()


def _counts(x: Tensor, thresholds: Tensor, fused: bool) -> Int[Tensor, "tokens k"]:
    """``#{v : x[t, v] > thresholds[t, j]}``. The broadcast form is one pass once compiled;
    eagerly it would materialise ``[tokens, vocab, k]``, so eager code loops over ``k``."""
    if fused:
        return (x.unsqueeze(-1) > thresholds.unsqueeze(1)).sum(1, dtype=torch.int32)
    columns = [
        (x > thresholds[:, j : j + 1]).sum(-1, dtype=torch.int32)
        for j in range(thresholds.shape[1])
    ]
    return torch.stack(columns, dim=-1)


def _pass_fp32(logits, thresholds, fused: bool = False):
    """Counts of entries ``> thresholds[:, j]``, the log-normaliser and the block maxima."""
    x = logits.float()
    return _counts(x, thresholds, fused), _lse(x), _block_max(x)


def _upper_bound(logits16, bias, row_input_error, row_norm, col_norm, col_error):
    """fp32 values ``>=`` the fp32 path's logits (see the module docstring).

    Row terms are ``[tokens, 1]``; column terms ``[vocab]`` or ``[tokens, n]`` like ``logits16``.
    """
    y = logits16.float()
    spread = row_input_error * col_norm + row_norm * col_error
    bound = y + (_BF16_UNIT / (1 - _BF16_UNIT) * 1.01) * y.abs() + spread + bias
    return bound + 2e-6 * (y.abs() + bias.abs() + spread)  # fp32 rounding of this formula


def _pass_bf16(
    logits16, bias, thresholds, row_input_error, row_norm, col_norm, col_error, fused=False
):
    """:func:`_pass_fp32` on ``bf16 logits + bias``, with block maxima of the upper bounds."""
    x = logits16.float() + bias
    counts = _counts(x, thresholds, fused)
    upper = _upper_bound(
        logits16, bias, row_input_error.unsqueeze(-1), row_norm.unsqueeze(-1), col_norm, col_error
    )
    return counts, _lse(x), _block_max(upper)


_KERNELS: dict[str, object] = {}
_COMPILE_MIN_ELEMENTS = 1 << 24  # ~340 tokens x 49k vocab: below this, compiling costs more


def _kernel(name: str, n_elements: int | None = None):
    """The compiled pass ``name`` for large inputs; the eager one for small inputs, or when
    compiling is off (``BEYOND_TOP1_COMPILE=0``) or fails (no C++ compiler, ...).

    Compiling takes ~10-30 s once per process (less with a warm inductor cache), so one prompt
    in a notebook never pays it; a corpus scan does, once, and then reads each logit matrix once
    instead of ``k + 3`` times. Both give the same results.
    """
    eager = {"fp32": _pass_fp32, "bf16": _pass_bf16}[name]
    if n_elements is not None and n_elements < _COMPILE_MIN_ELEMENTS:
        return eager
    if name in _KERNELS:
        return _KERNELS[name]
    if os.environ.get(COMPILE_ENV, "1") == "0":
        _KERNELS[name] = eager
        return eager
    compiled = torch.compile(functools.partial(eager, fused=True), dynamic=True)

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
    weight_t: Tensor | None = None  # [vocab, d_model] contiguous, for row gathers
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
            out.weight_t = weight.t().contiguous()
            out.col_norm16 = w16_f.norm(dim=0) * 1.001
            out.col_error = ((weight.float() - w16_f).norm(dim=0) + gamma * w_norm) * 1.001
        return out


_UNEMBEDDING_CACHE: dict[tuple, _Unembedding] = {}


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------


def _top_blocks(blocks: Tensor, n_blocks: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``n_blocks`` blocks with the largest maxima, and the largest maximum
    outside them (``-inf`` when every block is selected)."""
    total = blocks.shape[-1]
    if n_blocks >= total:
        index = torch.arange(total, device=blocks.device).expand(blocks.shape[0], total)
        return index, torch.full_like(blocks[:, 0], -math.inf)
    values, index = blocks.topk(n_blocks + 1, dim=-1)
    return index[:, :n_blocks], values[:, n_blocks]


def _block_entries(block_index: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Vocabulary ids of the entries of the given blocks ``[tokens, n*BLOCK]`` and a validity
    mask (the last block may be shorter than ``BLOCK``)."""
    offsets = torch.arange(BLOCK, device=block_index.device)
    ids = (block_index.unsqueeze(-1) * BLOCK + offsets).flatten(1)
    valid = ids < vocab
    return ids.clamp_max(vocab - 1), valid


def _ranks_within(values: Tensor, thresholds: Tensor) -> Tensor:
    """``1 + #{top-k values > threshold}``: the exact rank of a token whose logit is at least
    the k-th value (anything above it is in the top-k)."""
    return 1 + (values.unsqueeze(1) > thresholds.unsqueeze(-1)).sum(-1)


def _finish(ids, values, thresholds, counts, lse, final_ids, k):
    """Log-probs and ranks from the selected top-k and the fused pass's counts."""
    logprobs = values.float() - lse.unsqueeze(-1)
    if final_ids is None:  # the last layer: the final tokens are this top-k
        return ids, logprobs, _ranks_within(values, values)
    in_top = thresholds >= values[:, -1:]
    ranks = torch.where(in_top, _ranks_within(values, thresholds), counts.to(torch.int64) + 1)
    return ids, logprobs, ranks


def _layer_fp32(emb: _Unembedding, normed: Tensor, k: int, final_ids: Tensor | None):
    logits = _logits(normed, emb.weight, emb.bias).float()
    if emb.softcap > 0:
        logits = emb.softcap * torch.tanh(logits / emb.softcap)
    tokens, vocab = logits.shape
    thresholds = (
        logits.gather(-1, final_ids)
        if final_ids is not None
        else torch.full((tokens, k), math.inf, device=logits.device)
    )
    counts, lse, blocks = _kernel("fp32", logits.numel())(logits, thresholds)
    # Exact top-k from the top k+3 blocks; any row whose next block could reach the k-th value
    # (a tie) takes the full topk.
    block_index, outside = _top_blocks(blocks, k + 3)
    entries, valid = _block_entries(block_index, vocab)
    scores = logits.gather(-1, entries).masked_fill(~valid, -math.inf)
    values, where = scores.topk(k, dim=-1)
    ids = entries.gather(-1, where)
    unsettled = ~(outside < values[:, -1])
    if unsettled.any():
        rows = unsettled.nonzero().squeeze(-1)
        values[rows], ids[rows] = logits[rows].topk(k, dim=-1)
    return (*_finish(ids, values, thresholds, counts, lse, final_ids, k), tokens)


def _layer_bf16(
    emb: _Unembedding, normed: Tensor, k: int, final_ids: Tensor | None, n_candidates: int
):
    tokens, d = normed.shape
    vocab = emb.weight.shape[1]
    gamma = 1.01 * d * _FP32_UNIT
    x16 = normed.to(torch.bfloat16)
    logits16 = x16 @ emb.weight16  # [T, V] bf16, accumulated in fp32
    x16_f = x16.float()
    row_input_error = ((normed.float() - x16_f).norm(dim=-1) + gamma * x16_f.norm(dim=-1)) * 1.001
    row_norm = normed.float().norm(dim=-1) * 1.001
    bias = emb.bias.float()
    thresholds = (
        _gathered_logits(normed, emb, final_ids).float()
        if final_ids is not None
        else torch.full((tokens, k), math.inf, device=normed.device)
    )
    bound_args = (row_input_error, row_norm, emb.col_norm16, emb.col_error)
    counts, lse16, blocks = _kernel("bf16", logits16.numel())(
        logits16, bias, thresholds, *bound_args
    )
    # Candidates: the n_candidates largest upper bounds within the blocks of largest bounds.
    n_cand = min(max(n_candidates, k + 1), vocab)
    block_index, outside_blocks = _top_blocks(blocks, -(-n_cand // BLOCK) + k + 3)
    entries, valid = _block_entries(block_index, vocab)
    bounds = _upper_bound(
        logits16.gather(-1, entries),
        bias[entries],
        row_input_error[:, None],
        row_norm[:, None],
        emb.col_norm16[entries],
        emb.col_error[entries],
    ).masked_fill(~valid, -math.inf)
    n_cand = min(n_cand, entries.shape[1])
    if n_cand < entries.shape[1]:
        top_bounds, where = bounds.topk(n_cand + 1, dim=-1)
        outside = torch.maximum(outside_blocks, top_bounds[:, n_cand])
        where = where[:, :n_cand]
    else:
        where = torch.arange(n_cand, device=bounds.device).expand(tokens, n_cand)
        outside = outside_blocks
    candidates = entries.gather(-1, where)
    candidate_valid = valid.gather(-1, where)
    exact = _gathered_logits(normed, emb, candidates).masked_fill(~candidate_valid, -math.inf)
    values, pick = exact.topk(k, dim=-1)
    ids = candidates.gather(-1, pick)
    # The normaliser with the candidates' bf16 terms replaced by their exact values.
    approx = (logits16.gather(-1, candidates).float() + bias[candidates]).masked_fill(
        ~candidate_valid, -math.inf
    )
    peak = lse16.unsqueeze(-1)
    mass = 1.0 - (approx - peak).exp().sum(-1) + (exact - peak).exp().sum(-1)
    lse = lse16 + mass.clamp_min(torch.finfo(torch.float32).tiny).log()
    ids, logprobs, ranks = _finish(ids, values, thresholds, counts, lse, final_ids, k)
    if final_ids is not None:  # counted on bf16 logits: at least k+1 when not in the top-k
        ranks = torch.where(thresholds >= values[:, -1:], ranks, ranks.clamp_min(k + 1))
    unsettled = ~(outside < values[:, -1])  # some non-candidate could reach the top-k
    if unsettled.any():
        rows = unsettled.nonzero().squeeze(-1)
        redo = _layer_fp32(emb, normed[rows], k, None if final_ids is None else final_ids[rows])
        ids[rows], logprobs[rows], ranks[rows] = redo[:3]
    return ids, logprobs, ranks, tokens - int(unsettled.sum())


def _gathered_logits(
    normed: Float[Tensor, "tokens d_model"], emb: _Unembedding, ids: Int[Tensor, "tokens n"]
) -> Float[Tensor, "tokens n"]:
    """fp32 logits of the given ids per row, each equal to the full fp32 path's bit for bit.

    Computed as GEMMs over the union of the ids' columns, ``_GATHER_ROWS`` rows at a time (a
    small union per chunk keeps the cost at a few percent of the full unembedding), reading
    rows of the transposed unembedding (contiguous). BLAS gives every element the same value as
    in the full product as long as the product is not tiny: chunks are padded to at least
    ``_MIN_GEMM_ROWS`` rows and 2 columns (checked by the test suite on the machine it runs on).
    """
    out = torch.empty(ids.shape, dtype=torch.float32, device=normed.device)
    weight_t = emb.weight_t if emb.weight_t is not None else emb.weight.t()
    for start in range(0, ids.shape[0], _GATHER_ROWS):
        rows = normed[start : start + _GATHER_ROWS]
        n_rows = rows.shape[0]
        if n_rows < _MIN_GEMM_ROWS:
            rows = torch.cat([rows, rows.new_zeros(_MIN_GEMM_ROWS - n_rows, rows.shape[1])])
        union, inverse = torch.unique(ids[start : start + _GATHER_ROWS], return_inverse=True)
        columns = union if len(union) > 1 else union.repeat(2)
        block = rows @ weight_t[columns].T + emb.bias[columns]
        out[start : start + n_rows] = block[:n_rows].float().gather(-1, inverse)
    return out


_GATHER_ROWS = 128
_MIN_GEMM_ROWS = 32


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
