"""Exact top-k read-outs through a lens: the per-batch kernel behind every scan.

See docs/conventions.md, "Exact read-outs". (Over 600 lines on purpose: the kernels and the
error bounds that make them exact belong together; split, a bound could drift from its code.)

**The exact rule.** At a layer, the order of the vocabulary is the order of the exact logits
``E_j = x · W_j + b_j``: ``x`` is the fp32 normed residual (the lens map and the final norm are
evaluated in float64 and rounded once to fp32), ``W_j`` and ``b_j`` the fp32 unembedding column and
bias. ``E_j`` is summed in float64 along a fixed pairwise tree of elementwise IEEE additions (the
products of two fp32 numbers are exact in float64), so its bits depend on no BLAS, thread count,
batch, chunking or CPU. Ties are broken by the lower token id. Soft-capping is monotone and does
not change the order.

**Fast paths propose, the exact rule decides.** For every layer:

1. Fast logits ``v_j`` come from one GEMM (``"fp32"``, or ``"bf16"`` with fp32 accumulation) with a
   rigorous bound ``e_j >= |v_j - E_j|`` that holds for any summation order: fp32,
   ``γ_d ‖x‖ ‖W_j‖ + 2u|v_j|`` (``γ_d = d u / (1 - d u)``, ``u = 2^-24``); bf16, the rounding of
   ``x`` and ``W`` to bf16 plus accumulation plus the bf16 rounding of the output.
2. ``τ``, the k-th largest lower bound ``v_j - e_j``, is at most the k-th largest ``E``. Every
   token with ``v_j + e_j >= τ`` is a candidate; no other token can be in the top k or tie one.
3. bf16 only: the ``ceil(n_candidates / 64) + k + 3`` vocabulary blocks of 64 entries with the
   largest upper bounds are read again in fp32 (one small GEMM per distinct block over the rows
   that chose it, ~1% of the vocabulary); their fp32 logits, with the fp32 bound, prune the
   candidates again and replace their bf16 terms in the log-normaliser. Rows where a token
   outside those blocks could reach ``τ`` are read in fp32 whole.
4. If exactly k candidates remain and their intervals ``[v - e, v + e]`` are disjoint, their
   order is the exact order. Otherwise the candidates' ``E`` are computed and sorted by
   ``(-E, id)``.

**What is exact.** Top-k ids and their order, the ranks of the final top-k tokens while they are
within the top k, and so every saturation layer, are the exact rule's, identical across
precision, batch size and composition, chunking, thread count and CPU vendor (given the same
residuals).

**What carries an error bound.**

* A rank beyond ``k`` is ``1 + #{j : v_j > v_t}`` on the fast logits (at least ``k + 1``); it can
  be off by the number of tokens whose logits lie within ``e_j + e_t`` of the token's (fp32:
  ``e ≈ 4e-3`` on SmolLM2, rarely any token; bf16: ``e ≈ 0.05-0.1``).
* Log-probs: :attr:`TopKReadout.logprob_error` holds, per position and layer, a rigorous bound
  on ``|logprob - exact logprob|`` for every top-k entry: the bound of the top-k logits (zero
  for exact ones) plus that of the log-normaliser, ``-log(1 - Σ_j p_j (e^{e_j} - 1)) + γ_V``.
  Typical: fp32 ``~1e-2`` (the worst-case GEMM bound; the real error is ``~1e-6``), bf16 up
  to ``~0.1`` on flat early layers (real errors up to ``~0.02``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.runtime import has_fast_bf16

PRECISIONS = ("fp32", "bf16")
COMPILE_ENV = "BEYOND_TOP1_COMPILE"
DEFAULT_CANDIDATES = 32
_FP32_UNIT = 2.0**-24
_SAFETY = 1.0 + 2.0**-12  # covers the fp32 rounding of the bound formulas themselves
BLOCK = 64  # vocabulary entries per block of the block-max selection
_EXACT_CHUNK_ELEMENTS = 1 << 22  # float64 products held at once by the exact evaluation


@dataclass
class TopKReadout:
    """Per position and layer: the lens' top-k and the ranks of the final top-k tokens.

    ``layers[j]`` is the layer of column ``j``; the last entry is always ``L-1``, whose top-k
    (``final_ids``) defines the final tokens whose ranks are tracked.

    Attributes:
        top_ids: exact top-k ids in rank order (see the module docstring).
        top_logprobs: their log-probs under the lens, within ``logprob_error``.
        final_ranks: 1-based rank of final token ``i`` at every layer; exact while ``<= k``
            (then ``top_ids[t, l, rank - 1] == final_ids[t, i]``), approximate beyond.
        logprob_error: a bound on the error of every ``top_logprobs`` entry of that row.
        n_exact_rows: (position, layer) rows whose order the float64 rule had to settle.
        n_fallback_rows: rows read whole (bf16: in fp32; fp32: a full candidate search).
        precision: the GEMM that proposed (``"fp32"`` where bf16 was asked for but is not
            native to the device).
        bf16_error: the part of ``logprob_error`` that comes from bf16 logits (the normaliser's
            terms outside the blocks read in fp32; 0 where a row was read in fp32): what an fp32
            read of the row would remove. ``None`` for fp32 read-outs.
    """

    layers: tuple[int, ...]
    top_ids: Int[Tensor, "tokens layer k"]
    top_logprobs: Float[Tensor, "tokens layer k"]
    final_ranks: Int[Tensor, "tokens layer k"]
    logprob_error: Float[Tensor, "tokens layer"]
    n_exact_rows: int = 0
    n_fallback_rows: int = 0
    precision: str = "fp32"
    bf16_error: Float[Tensor, "tokens layer"] | None = None

    @property
    def final_ids(self) -> Int[Tensor, "tokens k"]:
        return self.top_ids[:, -1]


# ---------------------------------------------------------------------------------------------
# The exact rule
# ---------------------------------------------------------------------------------------------


def _tree_sum(values: Float[Tensor, "... n"]) -> Float[Tensor, "..."]:
    """Sum over the last axis along a fixed pairwise tree of elementwise additions: the same
    bits on every IEEE machine, whatever the vectorisation of reductions."""
    while values.shape[-1] > 1:
        n = values.shape[-1]
        half = n // 2
        summed = values[..., :half] + values[..., half : 2 * half]
        values = torch.cat([summed, values[..., 2 * half :]], dim=-1) if n % 2 else summed
    return values[..., 0]


def exact_logits(
    normed: Float[Tensor, "tokens d_model"],
    weight: Float[Tensor, "d_model vocab"],
    bias: Float[Tensor, " vocab"],
    ids: Int[Tensor, "tokens n"],
) -> Float[Tensor, "tokens n"]:
    """The exact rule's logits ``E`` (float64) of token ``ids[t, i]`` at row ``t``.

    Products of fp32 numbers are exact in float64; the sum follows :func:`_tree_sum`, so the
    result is the same on any machine and in any batch.
    """
    rows, n = ids.shape
    out = torch.empty((rows, n), dtype=torch.float64, device=normed.device)
    if rows == 0 or n == 0:
        return out
    d = normed.shape[-1]
    columns = weight.t()  # [vocab, d_model] view: gathering rows of it gathers columns of W
    step = max(1, _EXACT_CHUNK_ELEMENTS // (n * d))
    for start in range(0, rows, step):
        part = ids[start : start + step]
        products = columns[part].to(torch.float64) * normed[start : start + step, None].to(
            torch.float64
        )
        out[start : start + step] = _tree_sum(products) + bias[part].to(torch.float64)
    return out


def _exact_order(normed, emb, ids, valid, k):
    """Top-k of the candidates ``ids`` (``valid`` marks real entries) by ``(-E, id)``.

    Returns ids ``[rows, k]`` and their exact logits (float64)."""
    sentinel = torch.iinfo(torch.int64).max
    by_id, perm = ids.masked_fill(~valid, sentinel).sort(dim=-1)
    valid = valid.gather(-1, perm)
    exact = exact_logits(normed, emb.weight, emb.bias, by_id.masked_fill(~valid, 0))
    exact = exact.masked_fill(~valid, -math.inf)
    values, order = exact.sort(dim=-1, descending=True, stable=True)  # ties keep id order
    return by_id.gather(-1, order[:, :k]), values[:, :k]


# ---------------------------------------------------------------------------------------------
# The unembedding and its error terms
# ---------------------------------------------------------------------------------------------


@dataclass
class _Unembedding:
    weight: Tensor  # [d_model, vocab] fp32
    bias: Tensor  # [vocab] fp32
    has_bias: bool  # whether any bias entry is non-zero
    col_norm: Tensor  # ‖W_j‖, rounded up
    gamma: float  # γ_d for fp32 dot products of length d_model
    softcap: float = -1.0
    weight16: Tensor | None = None  # bf16 copy
    weight_blocks: Tensor | None = None  # [blocks, BLOCK, d_model] fp32 (zero-padded rows)
    bias_blocks: Tensor | None = None  # [blocks, BLOCK] fp32 (zero-padded)
    col_norm16: Tensor | None = None  # ‖bf16(W_j)‖, rounded up
    col_error: Tensor | None = None  # ‖W_j - bf16(W_j)‖ + γ‖W_j‖, rounded up

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, normed: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows vocab"]:
        """fp32 GEMM logits ``normed @ W + b``; the bias is added in place (no second
        ``[rows, vocab]`` array), and not at all where it is zero (a pass over the logits
        saved: ~10% of an fp32 read-out on SmolLM2)."""
        with _ieee_matmul():
            out = normed @ self.weight
        if self.has_bias:
            out += self.bias
        return out

    @classmethod
    def of(cls, model, precision: str) -> _Unembedding:
        """Cached per (weights, version, precision): the copies and norms of a ``[d_model,
        vocab]`` matrix cost more than a small batch's read-out."""
        weight, bias = hooked.unembedding(model)
        key = (weight.data_ptr(), weight._version, bias.data_ptr(), bias._version)
        key += (tuple(weight.shape), weight.dtype, precision)
        cached = _UNEMBEDDING_CACHE.get(key)
        if cached is None:
            cached = cls.of_tensors(weight, bias, precision, hooked.logit_softcap(model))
            if len(_UNEMBEDDING_CACHE) >= 2:  # one model's fp32 and bf16 copies at most
                _UNEMBEDDING_CACHE.clear()
            _UNEMBEDDING_CACHE[key] = cached
        return cached

    @classmethod
    def of_tensors(cls, weight, bias, precision: str, softcap: float = -1.0) -> _Unembedding:
        weight, bias = weight.float(), bias.float()
        d = weight.shape[0]
        gamma = d * _FP32_UNIT / (1 - d * _FP32_UNIT)
        norm = weight.double().norm(dim=0)
        out = cls(weight, bias, bool(bias.any()), (norm * _SAFETY).float(), gamma, softcap)
        if precision == "bf16":
            w16 = weight.to(torch.bfloat16)
            out.weight16 = w16
            padded = -(-weight.shape[1] // BLOCK) * BLOCK
            weight_t = torch.zeros(padded, d, dtype=weight.dtype, device=weight.device)
            weight_t[: weight.shape[1]] = weight.t()
            out.weight_blocks = weight_t.view(padded // BLOCK, BLOCK, d)
            bias_t = torch.zeros(padded, dtype=bias.dtype, device=bias.device)
            bias_t[: weight.shape[1]] = bias
            out.bias_blocks = bias_t.view(padded // BLOCK, BLOCK)
            out.col_norm16 = (w16.double().norm(dim=0) * _SAFETY).float()
            error = (weight.double() - w16.double()).norm(dim=0) + gamma * norm
            out.col_error = (error * _SAFETY).float()
        return out


_UNEMBEDDING_CACHE: dict[tuple, _Unembedding] = {}


def _row_norm(x: Float[Tensor, "tokens d"]) -> Float[Tensor, " tokens"]:
    return (x.double().norm(dim=-1) * _SAFETY).float()


# The two bounds below run inside compiled kernels: their constants are literals, because
# torch.compile(dynamic=True) turns float globals into symbolic inputs (2x slower kernels).
# 2**-23 = 2u (fp32), 1 + 2**-12 = _SAFETY, 2**-8 = the bf16 unit roundoff.


def _fp32_error(v, row_scale, col_norm):
    """Bound on ``|v - E|`` for fp32 GEMM logits ``v`` (``row_scale = γ_d ‖x‖``)."""
    return (row_scale * col_norm + 2.0**-23 * v.abs()) * (1.0 + 2.0**-12)


def _bf16_error(y, bias, row_input_error, row_norm, col_norm16, col_error):
    """Bound on ``|y + b - E|`` for a bf16 GEMM output ``y``: ``x·W - x16·W16`` and the fp32
    accumulation (``row_input_error·‖W16_j‖ + ‖x‖·col_error``), the bf16 output rounding, and
    the fp32 rounding of ``y + b`` and of this formula."""
    spread = row_input_error * col_norm16 + row_norm * col_error
    out = (2.0**-8 / (1 - 2.0**-8)) * y.abs() + spread
    return (out + 2e-6 * (y.abs() + bias.abs() + spread)) * (1.0 + 2.0**-12)


# ---------------------------------------------------------------------------------------------
# One fused pass over [tokens, vocab] logits (compiled once for large inputs, eager otherwise)
# ---------------------------------------------------------------------------------------------


def _block_max(scores: Float[Tensor, "tokens vocab"]) -> Float[Tensor, "tokens blocks"]:
    """Max of every ``BLOCK`` consecutive entries (the last block may be shorter)."""
    tokens, vocab = scores.shape
    full = vocab // BLOCK
    blocks = scores[:, : full * BLOCK].reshape(tokens, full, BLOCK).amax(-1)
    if vocab > full * BLOCK:
        blocks = torch.cat([blocks, scores[:, full * BLOCK :].amax(-1, keepdim=True)], dim=-1)
    return blocks


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


def _summaries(v, err, thresholds, softcap: float, fused: bool):
    """Counts above ``thresholds``, the log-normaliser, ``Σ p_j (err_j + err_j²)`` (which is
    ``>= Σ p_j (e^{err_j} - 1)`` for ``err <= 1``) and the block maxima of ``v + err``."""
    capped = softcap * torch.tanh(v / softcap) if softcap > 0 else v
    peak = capped.amax(-1, keepdim=True)
    weights = (capped - peak).exp()
    total = weights.sum(-1)
    spread = (weights * (err + err * err)).sum(-1) / total
    lse = peak.squeeze(-1) + total.log()
    return _counts(v, thresholds, fused), lse, spread, _block_max(v + err)


def _pass_fp32(logits, thresholds, row_scale, col_norm, softcap=-1.0, fused=False):
    """:func:`_summaries` of fp32 logits."""
    err = _fp32_error(logits, row_scale, col_norm)
    return _summaries(logits, err, thresholds, softcap, fused)


def _pass_bf16(
    logits16, bias, thresholds, row_input_error, row_norm, col_norm16, col_error, softcap=-1.0,
    fused=False,
):  # fmt: skip
    """:func:`_summaries` of ``bf16 logits + bias``."""
    y = logits16.float()
    err = _bf16_error(y, bias, row_input_error, row_norm, col_norm16, col_error)
    return _summaries(y + bias, err, thresholds, softcap, fused)


_KERNELS: dict[str, object] = {}
_COMPILE_MIN_ELEMENTS = 1 << 24  # ~340 tokens x 49k vocab: below this, compiling costs more


def _kernel(name: str, n_elements: int | None = None):
    """The compiled pass ``name`` for large inputs; the eager one for small inputs, or when
    compiling is off (``BEYOND_TOP1_COMPILE=0``) or fails (no C++ compiler, ...).

    Compiling takes ~10-30 s once per process (less with a warm inductor cache), so one prompt
    in a notebook never pays it; a corpus scan does, once, and then reads each logit matrix once
    instead of ``k + 4`` times, whatever its size (a saturation scan's lower layers read few
    rows: eagerly they cost ~2x the compiled pass per element). Results agree within the error
    bounds, which is all the exact rule uses them for.
    """
    eager = {"fp32": _pass_fp32, "bf16": _pass_bf16}[name]
    if name in _KERNELS:  # once compiled, small inputs use it too (a saturation scan's layers)
        return _KERNELS[name]
    if n_elements is not None and n_elements < _COMPILE_MIN_ELEMENTS:
        return eager
    if os.environ.get(COMPILE_ENV, "1") == "0":
        _KERNELS[name] = eager
        return eager
    with warnings.catch_warnings():  # importing inductor runs torch's own torch.jit code
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
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


BF16_ENV = "BEYOND_TOP1_BF16"  # "emulate": run the bf16 path as fp32 GEMMs of bf16 values


def _bf16_gemm(device: torch.device):
    """The bf16 GEMM to propose with, or ``None`` where the device has no fast one.

    Without native bf16 (e.g. AVX2-only CPUs) a bf16 GEMM is ~100x slower than fp32, so the
    fp32 path proposes instead: the exact rule makes the top-k the same either way.
    ``BEYOND_TOP1_BF16=emulate`` runs the bf16 path anyway, as an fp32 GEMM of the bf16
    values rounded to bf16 (the same arithmetic: exact products, fp32 sums), for tests.
    """
    if os.environ.get(BF16_ENV) == "emulate":
        return lambda x16, w16: (x16.float() @ w16.float()).to(torch.bfloat16)
    return torch.matmul if has_fast_bf16(device) else None


@functools.cache
def _warn_no_bf16(device_type: str) -> None:
    warnings.warn(
        f"precision='bf16': this {device_type} has no fast bf16 matrix multiply, so fp32 GEMMs "
        "propose the candidates instead (same top-k ids, ranks within k and saturation layers; "
        "slower than bf16 where it is native)",
        stacklevel=5,
    )


@contextlib.contextmanager
def _ieee_matmul():
    """fp32 GEMMs in full fp32 (no TF32 or bf16 shortcuts), which the fp32 bound assumes."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------------------------------------
# Candidates
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


def _kth_lower_bound(v: Tensor, err: Tensor, valid: Tensor, k: int) -> Float[Tensor, " rows"]:
    """``τ``: the k-th largest ``v - err`` among valid entries (<= the k-th largest ``E``)."""
    return (v - err).masked_fill(~valid, -math.inf).topk(k, dim=-1).values[:, -1]


def _compact(mask: Bool[Tensor, "rows n"], *tensors: Tensor) -> tuple[Tensor, ...]:
    """The entries where ``mask`` holds, moved to the front of each row and cut to the widest
    row; returns ``(valid, *tensors)`` of shape ``[rows, max count]``."""
    width = max(int(mask.sum(-1).max()), 1) if mask.numel() else 1
    order = mask.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :width]
    return (mask.gather(-1, order), *(t.gather(-1, order) for t in tensors))


@dataclass
class _Candidates:
    """Per row: tokens that could be in the top k, with fast logits and their error bounds."""

    ids: Tensor  # [rows, n]
    values: Tensor  # [rows, n] fast logits (fp32)
    errors: Tensor  # [rows, n]
    valid: Tensor  # [rows, n]

    @classmethod
    def select(cls, ids, values, errors, valid, k: int) -> tuple[_Candidates, Tensor]:
        """Entries whose upper bound reaches ``τ``; also returns ``τ`` per row."""
        tau = _kth_lower_bound(values, errors, valid, k)
        keep = valid & (values + errors >= tau[:, None])
        keep_valid, ids, values, errors = _compact(keep, ids, values, errors)
        return cls(ids, values, errors, keep_valid), tau

    def rows(self, index: Tensor) -> _Candidates:
        return _Candidates(
            self.ids[index], self.values[index], self.errors[index], self.valid[index]
        )


def _resolve(normed, emb, cand: _Candidates, k: int):
    """Top-k ids, logits (float64) and their error bounds from candidate lists.

    Rows with exactly ``k`` candidates whose intervals are disjoint keep the fast order; the
    rest are settled by :func:`_exact_order`. Returns ``(ids, logits, errors, n_exact)``.
    """
    values = cand.values.masked_fill(~cand.valid, -math.inf)
    order = values.argsort(dim=-1, descending=True, stable=True)[:, :k]
    ids = cand.ids.gather(-1, order)
    top = cand.values.gather(-1, order).to(torch.float64)
    err = cand.errors.gather(-1, order).to(torch.float64)
    separated = (top[:, :-1] - err[:, :-1] > top[:, 1:] + err[:, 1:]).all(-1)
    settled = (cand.valid.sum(-1) == k) & separated
    ambiguous = (~settled).nonzero().squeeze(-1)
    if len(ambiguous):
        sub = cand.rows(ambiguous)
        exact_ids, exact_values = _exact_order(normed[ambiguous], emb, sub.ids, sub.valid, k)
        ids[ambiguous], top[ambiguous], err[ambiguous] = exact_ids, exact_values, 0.0
    return ids, top, err, len(ambiguous)


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    ids: Tensor  # [rows, k]
    logprobs: Tensor  # [rows, k]
    ranks: Tensor  # [rows, k] (final tokens' ranks; 1..k at the last layer)
    logprob_error: Tensor  # [rows]
    n_exact: int
    n_fallback: int
    bf16_error: Tensor | None = None  # [rows]: the bf16 part of logprob_error


def _normaliser_bound(spread: Tensor, vocab: int) -> Tensor:
    """Bound on ``|log Z_fast - log Z|`` from ``Σ p_j (e^{e_j} - 1)`` and the rounding of the
    fp32 sum (``γ_V``) and of the exponentials."""
    gamma_v = vocab * _FP32_UNIT / (1 - vocab * _FP32_UNIT) + 16 * _FP32_UNIT
    ratio = spread.double() + gamma_v
    return torch.where(ratio < 1, -torch.log1p(-ratio.clamp_max(0.999999)), math.inf)


def _finish(emb, cand_logits, cand_err, lse, lse_bound, ids, thresholds, counts, final_ids, k):
    """Log-probs, their bounds, and the final tokens' ranks from the settled top-k."""
    cap = emb.softcap
    capped = cap * torch.tanh(cand_logits / cap) if cap > 0 else cand_logits
    logprobs = (capped - lse.double().unsqueeze(-1)).float()
    error = (cand_err.amax(-1) + lse_bound + 4 * _FP32_UNIT * logprobs.abs().amax(-1)).float()
    if final_ids is None:  # the last layer: the final tokens are this top-k
        ranks = torch.arange(1, k + 1, device=ids.device).expand(ids.shape[0], k)
        return logprobs, error, ranks.clone()
    match = final_ids.unsqueeze(-1) == ids.unsqueeze(1)  # [rows, final i, layer rank r]
    inside = match.any(-1)
    place = match.to(torch.int64).argmax(-1) + 1
    outside = (counts.to(torch.int64) + 1).clamp_min(k + 1)
    return logprobs, error, torch.where(inside, place, outside)


def _layer_fp32(emb: _Unembedding, normed: Tensor, k: int, final_ids: Tensor | None) -> _Layer:
    rows, vocab = normed.shape[0], emb.vocab
    logits = emb.logits(normed)
    row_scale = (emb.gamma * _row_norm(normed)).unsqueeze(-1)
    thresholds = (
        logits.gather(-1, final_ids)
        if final_ids is not None
        else torch.full((rows, k), math.inf, device=logits.device)
    )
    counts, lse, spread, blocks = _kernel("fp32", logits.numel())(
        logits, thresholds, row_scale, emb.col_norm, emb.softcap
    )
    block_index, outside = _top_blocks(blocks, k + 3)
    entries, valid = _block_entries(block_index, vocab)
    values = logits.gather(-1, entries)
    errors = _fp32_error(values, row_scale, emb.col_norm[entries])
    cand, tau = _Candidates.select(entries, values, errors, valid, k)
    wide = outside >= tau  # a token outside the selected blocks may compete: search the row
    ids = torch.empty((rows, k), dtype=torch.int64, device=logits.device)
    top = torch.empty((rows, k), dtype=torch.float64, device=logits.device)
    err = torch.empty_like(top)
    n_exact = 0
    for part, is_wide in ((~wide).nonzero().squeeze(-1), False), (wide.nonzero().squeeze(-1), True):
        if not len(part):
            continue
        if is_wide:
            every = torch.arange(vocab, device=logits.device).expand(len(part), vocab)
            sub_values = logits[part]
            sub_errors = _fp32_error(sub_values, row_scale[part], emb.col_norm)
            sub, _ = _Candidates.select(
                every, sub_values, sub_errors, torch.ones_like(every, dtype=torch.bool), k
            )
        else:
            sub = cand.rows(part)
        ids[part], top[part], err[part], n = _resolve(normed[part], emb, sub, k)
        n_exact += n
    bound = _normaliser_bound(spread, vocab)
    logprobs, error, ranks = _finish(
        emb, top, err, lse, bound, ids, thresholds, counts, final_ids, k
    )
    return _Layer(ids, logprobs, ranks, error, n_exact, int(wide.sum()))


def _block_logits(
    normed: Float[Tensor, "tokens d_model"], emb: _Unembedding, block_index: Int[Tensor, "tokens n"]
) -> Float[Tensor, "tokens n_entries"]:
    """fp32 logits of every entry of the given vocabulary blocks per row (``n * BLOCK``
    entries, in :func:`_block_entries` order), within the fp32 bound of the exact ones.

    The (row, block) pairs are grouped by block, so each block's weights are read once per
    call: one ``[rows choosing it, d] @ [d, BLOCK]`` GEMM per distinct block (gathering the
    weights per row instead moves ~1.3 MB per row and costs 5x the bf16 GEMM).
    """
    rows, n = block_index.shape
    flat = block_index.flatten()
    order = flat.argsort(stable=True)
    blocks, counts = torch.unique_consecutive(flat[order], return_counts=True)
    x = normed[order // n]  # [rows * n, d], grouped by block
    values = torch.empty((rows * n, BLOCK), dtype=torch.float32, device=normed.device)
    weights = emb.weight_blocks
    start = 0
    with _ieee_matmul():
        for block, count in zip(blocks.tolist(), counts.tolist(), strict=True):
            torch.matmul(
                x[start : start + count], weights[block].T, out=values[start : start + count]
            )
            start += count
    out = torch.empty_like(values)
    out[order] = values
    out = out.view(rows, n * BLOCK)
    if emb.has_bias:
        out += emb.bias_blocks[block_index].flatten(1)
    return out


def _layer_bf16(
    emb: _Unembedding,
    normed: Tensor,
    k: int,
    final_ids: Tensor | None,
    n_candidates: int,
    gemm=torch.matmul,
) -> _Layer:
    rows = normed.shape[0]
    vocab = emb.vocab
    x16 = normed.to(torch.bfloat16)
    logits16 = gemm(x16, emb.weight16)  # [rows, vocab] bf16, accumulated in fp32
    x16_f = x16.double()
    row_input_error = (normed.double() - x16_f).norm(dim=-1) + emb.gamma * x16_f.norm(dim=-1)
    row_input_error = (row_input_error * _SAFETY).float().unsqueeze(-1)
    row_norm = _row_norm(normed).unsqueeze(-1)
    bias = emb.bias
    thresholds = (
        logits16.gather(-1, final_ids).float() + bias[final_ids]  # the kernel's own values
        if final_ids is not None
        else torch.full((rows, k), math.inf, device=normed.device)
    )
    error_terms = (row_input_error, row_norm, emb.col_norm16, emb.col_error)
    counts, lse16, spread16, blocks = _kernel("bf16", logits16.numel())(
        logits16, bias, thresholds, *error_terms, emb.softcap
    )
    n_cand = min(max(n_candidates, k + 1), vocab)
    block_index, outside = _top_blocks(blocks, -(-n_cand // BLOCK) + k + 3)
    entries, valid = _block_entries(block_index, vocab)
    y = logits16.gather(-1, entries).float()
    errors16 = _bf16_error(
        y, bias[entries], row_input_error, row_norm, emb.col_norm16[entries], emb.col_error[entries]
    )
    values16 = y + bias[entries]
    tau16 = _kth_lower_bound(values16, errors16, valid, k)
    # Rows where a token outside the selected blocks may compete: fp32 over the whole row.
    wide = outside >= tau16
    ids = torch.empty((rows, k), dtype=torch.int64, device=normed.device)
    logprobs = torch.empty((rows, k), dtype=torch.float32, device=normed.device)
    ranks = torch.empty((rows, k), dtype=torch.int64, device=normed.device)
    error = torch.empty(rows, dtype=torch.float32, device=normed.device)
    bf16_error = torch.zeros(rows, dtype=torch.float32, device=normed.device)
    n_exact = 0
    part = (~wide).nonzero().squeeze(-1)
    if len(part):
        x = normed[part]
        # fp32 logits of every entry of the selected blocks: a second pruning, and the bulk
        # of a confident row's normaliser in fp32 (the bf16 one is bounded only to ~0.02 nats).
        values32 = _block_logits(x, emb, block_index[part])
        row_scale = (emb.gamma * _row_norm(x)).unsqueeze(-1)
        errors32 = _fp32_error(values32, row_scale, emb.col_norm[entries[part]])
        cand32, _ = _Candidates.select(entries[part], values32, errors32, valid[part], k)
        ids[part], top, err, n_exact = _resolve(x, emb, cand32, k)
        in_blocks = _Candidates(entries[part], values16[part], errors16[part], valid[part])
        lse, bound, bf16_error[part] = _corrected_normaliser(
            emb, lse16[part], spread16[part], in_blocks, values32, errors32, vocab
        )
        logprobs[part], error[part], ranks[part] = _finish(
            emb, top, err, lse, bound, ids[part], thresholds[part], counts[part],
            None if final_ids is None else final_ids[part], k,
        )  # fmt: skip
    redo = wide.nonzero().squeeze(-1)
    if len(redo):
        sub = _layer_fp32(emb, normed[redo], k, None if final_ids is None else final_ids[redo])
        ids[redo], logprobs[redo], ranks[redo], error[redo] = (
            sub.ids,
            sub.logprobs,
            sub.ranks,
            sub.logprob_error,
        )
        n_exact += sub.n_exact
    return _Layer(ids, logprobs, ranks, error, n_exact, len(redo), bf16_error)


def _corrected_normaliser(emb, lse16, spread16, cand16, values32, errors32, vocab):
    """``log Z`` with the given entries' bf16 terms swapped for fp32 ones, its bound, and the
    bound of the part left in bf16 (the terms outside the entries)."""
    cap = emb.softcap

    def capped(v):
        return cap * torch.tanh(v / cap) if cap > 0 else v

    peak = lse16.double().unsqueeze(-1)
    w16 = (capped(cand16.values.double()) - peak).exp().masked_fill(~cand16.valid, 0.0)
    w32 = (capped(values32.double()) - peak).exp().masked_fill(~cand16.valid, 0.0)
    mass = (1.0 - w16.sum(-1) + w32.sum(-1)).clamp_min(1e-300)
    lse = lse16.double() + mass.log()
    # Σ over non-candidates of p16 (e^{e16} - 1), plus the candidates' fp32 terms, over Z.
    e16 = cand16.errors.double()
    outside = spread16.double() - (w16 * (e16 + e16 * e16)).sum(-1)
    inside = (w32 * torch.expm1(errors32.double())).sum(-1)
    gamma_v = vocab * _FP32_UNIT / (1 - vocab * _FP32_UNIT)
    ratio = (outside.clamp_min(0) + inside + gamma_v * (1 + spread16.double())) / mass
    left = outside.clamp_min(0) / mass
    left_bound = torch.where(left < 1, -torch.log1p(-left.clamp_max(0.999999)), math.inf)
    return lse, _normaliser_bound(ratio, vocab), left_bound.float()


# ---------------------------------------------------------------------------------------------
# All layers
# ---------------------------------------------------------------------------------------------


def normed_residual(
    lens, resid: Float[Tensor, "tokens d_model"], layer: int
) -> Float[Tensor, "tokens d_model"]:
    """``x`` of the exact rule: the lens map and the final norm in float64, rounded to fp32."""
    return hooked.final_norm(lens.model, lens.transform(resid.double(), layer)).float()


class _LayerReader:
    """One layer's exact top-k of given residual rows through a lens (fp32 or bf16 proposals);
    the rows are independent, so any subset of them reads the same."""

    def __init__(self, lens, device: torch.device, precision: str, n_candidates: int):
        self.lens = lens
        self.gemm16 = _bf16_gemm(device) if precision == "bf16" else None
        if precision == "bf16" and self.gemm16 is None:
            _warn_no_bf16(device.type)
            precision = "fp32"
        self.precision = precision
        self.n_candidates = n_candidates
        self.emb = _Unembedding.of(lens.model, precision)

    def __call__(self, resid: Tensor, layer: int, k: int, final_ids: Tensor | None) -> _Layer:
        normed = normed_residual(self.lens, resid, layer)
        if self.precision == "fp32":
            return _layer_fp32(self.emb, normed, k, final_ids)
        return _layer_bf16(self.emb, normed, k, final_ids, self.n_candidates, self.gemm16)


def lens_topk(
    lens,
    resid: Float[Tensor, "tokens layer d_model"],
    layers: Sequence[int],
    k: int,
    *,
    precision: str = "fp32",
    n_candidates: int = DEFAULT_CANDIDATES,
) -> TopKReadout:
    """Exact top-k read-outs of ``resid`` (column ``j`` at ``layers[j]``) through ``lens``.

    Args:
        lens: a :class:`~beyond_top1.lenses.Lens`.
        resid: residual streams; ``layers`` must end with the last layer ``L-1``.
        k: ranks to track (``1 <= k <= vocab``).
        precision: ``"fp32"`` or ``"bf16"``: which GEMM proposes candidates. The top-k ids,
            their order, the in-top-k ranks and hence saturation layers do not depend on it
            (see the module docstring).
        n_candidates: bf16 path: sets the blocks read again in fp32 per row (see the module
            docstring).

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
    read = _LayerReader(lens, resid.device, precision, n_candidates)
    precision = read.precision
    tokens = resid.shape[0]
    shape = (tokens, len(layers), k)
    top_ids = torch.empty(shape, dtype=torch.int64, device=resid.device)
    top_logprobs = torch.empty(shape, dtype=torch.float32, device=resid.device)
    final_ranks = torch.empty(shape, dtype=torch.int64, device=resid.device)
    logprob_error = torch.empty(shape[:2], dtype=torch.float32, device=resid.device)
    bf16_error = torch.zeros(shape[:2], dtype=torch.float32, device=resid.device)
    n_exact = n_fallback = 0
    final_ids = None
    with torch.inference_mode():
        for j in reversed(range(len(layers))):  # the last layer first: it defines the final top-k
            if tokens == 0:
                continue
            layer = read(resid[:, j], layers[j], k, final_ids)
            top_ids[:, j], top_logprobs[:, j], final_ranks[:, j] = (
                layer.ids,
                layer.logprobs,
                layer.ranks,
            )
            logprob_error[:, j] = layer.logprob_error
            if layer.bf16_error is not None:
                bf16_error[:, j] = layer.bf16_error
            n_exact += layer.n_exact
            n_fallback += layer.n_fallback
            if final_ids is None:
                final_ids = layer.ids
    return TopKReadout(
        layers, top_ids, top_logprobs, final_ranks, logprob_error, n_exact, n_fallback, precision,
        bf16_error if precision == "bf16" else None,
    )  # fmt: skip


def reread_loose_logprobs(
    lens,
    resid: Float[Tensor, "tokens layer d_model"],
    readout: TopKReadout,
    tolerance: float,
) -> tuple[Float[Tensor, "tokens layer k"], int]:
    """Log-probs of ``readout`` with the (position, layer) rows read again in fp32 where the
    bf16 part of their error (:attr:`TopKReadout.bf16_error`) could move ``p_1 - p_2`` by more
    than ``tolerance`` from an fp32 read-out's.

    The ids never change (they are exact either way). Returns the log-probs (a new tensor when
    any row is read again) and the number of rows read again.
    """
    logprobs = readout.top_logprobs
    if readout.bf16_error is None or logprobs.shape[-1] < 2:
        return logprobs, 0
    probs = logprobs[..., :2].double().exp()
    bound = probs.sum(-1) * torch.expm1(readout.bf16_error.double())  # [tokens, layer]
    loose = bound > tolerance
    if not bool(loose.any()):
        return logprobs, 0
    read = _LayerReader(lens, resid.device, "fp32", DEFAULT_CANDIDATES)
    logprobs = logprobs.clone()
    k = logprobs.shape[-1]
    with torch.inference_mode():
        for j, layer in enumerate(readout.layers):
            rows = loose[:, j].nonzero().squeeze(-1)
            if len(rows):
                logprobs[rows, j] = read(resid[rows, j], layer, k, None).logprobs
    return logprobs, int(loose.sum())


@dataclass
class SaturationReadout:
    """Per position: the final top-k and the saturation layers, without the trajectories.

    Attributes:
        final_ids: exact top-k ids at the last layer (rank order).
        final_logprobs: their log-probs, within ``final_logprob_error``.
        s: saturation layers ``s_1..s_k`` (as :func:`beyond_top1.saturation.saturation_layers`
            of the full read-out).
        rows_read: (position, layer) rows read, the last layer included: the cost, against
            ``positions × L`` for :func:`lens_topk`.
    """

    final_ids: Int[Tensor, "tokens k"]
    final_logprobs: Float[Tensor, "tokens k"]
    final_logprob_error: Float[Tensor, " tokens"]
    s: Int[Tensor, "tokens k"]
    rows_read: int
    precision: str = "fp32"


def lens_saturation(
    lens,
    resid: Float[Tensor, "tokens layer d_model"],
    k: int,
    *,
    precision: str = "fp32",
    n_candidates: int = DEFAULT_CANDIDATES,
) -> SaturationReadout:
    """``s_1..s_k`` of ``resid`` (layers ``0..L-1``) read from the last layer down.

    ``s_i`` is the first layer of the final unbroken run of rank ``i``, so a position needs
    only the layers from the top down to where its last tracked run breaks: at each layer
    only the rows with a run still unbroken are read, by the same exact per-layer kernel as
    :func:`lens_topk` (rows are independent, so the ids, and hence ``s``, are the same).
    """
    model = lens.model
    L = hooked.n_layers(model)
    vocab = hooked.d_vocab(model)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if resid.ndim != 3 or resid.shape[1] != L:
        raise ValueError(
            f"resid must have shape [tokens, {L} layers, d_model], got {tuple(resid.shape)}"
        )
    read = _LayerReader(lens, resid.device, precision, n_candidates)
    tokens = resid.shape[0]
    device = resid.device
    with torch.inference_mode():
        last = read(resid[:, L - 1], L - 1, k, None)
        final_ids = last.ids
        s = torch.full((tokens, k), L - 1, dtype=torch.int64, device=device)
        running = torch.ones((tokens, k), dtype=torch.bool, device=device)
        rows_read = tokens
        for layer in range(L - 2, -1, -1):
            rows = running.any(-1).nonzero().squeeze(-1)
            if not len(rows):
                break
            ids = read(resid[rows, layer], layer, k, None).ids  # ids only: no rank counts
            rows_read += len(rows)
            holds = running[rows] & (ids == final_ids[rows])
            running[rows] = holds
            s[rows] = torch.where(holds, layer, s[rows])
    return SaturationReadout(
        final_ids, last.logprobs, last.logprob_error, s, rows_read, read.precision
    )


__all__ = [
    "PRECISIONS",
    "SaturationReadout",
    "TopKReadout",
    "exact_logits",
    "lens_saturation",
    "lens_topk",
    "normed_residual",
    "reread_loose_logprobs",
]
