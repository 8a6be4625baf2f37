"""Per (position, layer) statistics of a lens read-out beyond its top-k: the exact rank, log-prob
and logit of chosen target tokens, the entropy of the lens' distribution and its KL divergence
from the final layer's.

**Ranks of chosen tokens are the exact rule's** (:mod:`beyond_top1.ranking`): the rank of token
``t`` is ``1 + #{j : E_j > E_t} + #{j < t : E_j = E_t}`` over the whole vocabulary, ``E`` the
exact logits (ties broken by the lower id). One fp32 GEMM proposes: with its rigorous error
bound ``e_j``, a token with ``v_j - e_j > E_t`` is surely above ``t`` and one with
``v_j + e_j < E_t`` surely below; only the few tokens in between are evaluated exactly. So
these ranks are exact at any depth, not only within the top k, and identical on any machine
for the same residuals.

Log-probs are ``cap(E_t) - log Z`` with ``log Z`` summed in float64 over the fp32 GEMM logits,
so they carry that GEMM's round-off (up to 3e-5 nats against float64 on SmolLM2); logits are
``cap(E_t)`` (float64; ``cap`` is the model's soft-cap, if any). Entropy and
``KL(p_final ‖ p_lens)`` are in nats, computed in float64 from the fp32 GEMM logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.ranking import (
    _compact,
    _fp32_error,
    _row_norm,
    _Unembedding,
    exact_logits,
    normed_residual,
)

_ROWS = 64  # rows per chunk: [rows, vocab] float64 arrays stay ~25 MB at 49k tokens
_WIDE = 1024  # rows with more unsure tokens are settled one at a time


@dataclass
class CellStats:
    """Statistics of every (token, layer) cell; ``target_*`` are ``[..., n_targets]``.

    Attributes:
        target_ranks: 1-based exact rank of each target (``-1`` where the target is masked).
        target_logprobs: its log-prob under the lens (NaN where masked).
        target_logits: its logit, soft-capped like the model's (NaN where masked).
        entropy: entropy of the lens' distribution (nats).
        kl_to_final: ``KL(p_final ‖ p_lens)`` (nats); 0 at the last layer.
    """

    target_ranks: Int[Tensor, "tokens layer n"]
    target_logprobs: Float[Tensor, "tokens layer n"]
    target_logits: Float[Tensor, "tokens layer n"]
    entropy: Float[Tensor, "tokens layer"]
    kl_to_final: Float[Tensor, "tokens layer"]


def exact_ranks(
    normed: Float[Tensor, "rows d_model"],
    logits: Float[Tensor, "rows vocab"],
    emb: _Unembedding,
    target_ids: Int[Tensor, "rows n"],
    exact: Float[Tensor, "rows n"],
) -> Int[Tensor, "rows n"]:
    """Exact 1-based ranks of ``target_ids`` (whose exact logits are ``exact``), given the fp32
    GEMM ``logits`` of ``normed`` (see the module docstring)."""
    rows, vocab = logits.shape
    row_scale = (emb.gamma * _row_norm(normed)).unsqueeze(-1)
    err = _fp32_error(logits, row_scale, emb.col_norm).double()
    values = logits.double()
    ranks = torch.empty(target_ids.shape, dtype=torch.int64, device=logits.device)
    every = torch.arange(vocab, device=logits.device)
    for c in range(target_ids.shape[1]):
        e = exact[:, c : c + 1]
        t = target_ids[:, c : c + 1]
        surely_above = values - err > e
        unsure = ~surely_above & (values + err >= e) & (every != t)
        count = surely_above.sum(-1)
        width = unsure.sum(-1)
        narrow = (width > 0) & (width <= _WIDE)
        # Narrow rows together; wide ones (a degenerate, all-tied row) one at a time, so that
        # one of them does not widen the whole chunk to the vocabulary.
        for part in (narrow.nonzero().squeeze(-1), *(width > _WIDE).nonzero()):
            if not len(part):
                continue
            valid, ids = _compact(unsure[part], every.expand(len(part), vocab))
            others = exact_logits(normed[part], emb.weight, emb.bias, ids)
            above = (others > e[part]) | ((others == e[part]) & (ids < t[part]))
            count[part] += (above & valid).sum(-1)
        ranks[:, c] = count + 1
    return ranks


def cell_stats(
    lens,
    resid: Float[Tensor, "tokens layer d_model"],
    layers: Sequence[int],
    target_ids: Int[Tensor, "tokens n"],
) -> CellStats:
    """:class:`CellStats` of ``resid`` (column ``j`` at ``layers[j]``, ending with ``L-1``).

    ``target_ids`` holds per token the ids to follow; ``-1`` masks an entry (e.g. the next
    token after the last position).
    """
    model = lens.model
    layers = tuple(int(l) for l in layers)
    if not layers or layers[-1] != hooked.n_layers(model) - 1:
        raise ValueError(f"layers must end with the last layer, got {layers}")
    emb = _Unembedding.of(model, "fp32")
    tokens, n = target_ids.shape
    device = resid.device
    shape = (tokens, len(layers), n)
    ranks = torch.full(shape, -1, dtype=torch.int64, device=device)
    logprobs = torch.full(shape, float("nan"), dtype=torch.float64, device=device)
    target_logits = torch.full(shape, float("nan"), dtype=torch.float64, device=device)
    entropy = torch.empty((tokens, len(layers)), dtype=torch.float64, device=device)
    kl = torch.empty_like(entropy)
    cap = emb.softcap
    target_ids = target_ids.to(device)
    masked = target_ids < 0
    safe_ids = target_ids.clamp_min(0)
    with torch.inference_mode():
        for start in range(0, tokens, _ROWS):
            rows = slice(start, start + _ROWS)
            ids, keep = safe_ids[rows], ~masked[rows]
            final_logp = None
            for j in reversed(range(len(layers))):
                normed = normed_residual(lens, resid[rows, j], layers[j])
                logits = emb.logits(normed)
                capped = logits.double()
                if cap > 0:
                    capped = cap * torch.tanh(capped / cap)
                logp = capped.log_softmax(-1)
                p = logp.exp()
                entropy[rows, j] = -(p * logp).sum(-1)
                if final_logp is None:
                    final_logp = logp
                    kl[rows, j] = 0.0
                else:
                    kl[rows, j] = (final_logp.exp() * (final_logp - logp)).sum(-1)
                if n:
                    exact = exact_logits(normed, emb.weight, emb.bias, ids)
                    capped_t = cap * torch.tanh(exact / cap) if cap > 0 else exact
                    lse = capped.logsumexp(-1, keepdim=True)
                    r = exact_ranks(normed, logits, emb, ids, exact)
                    ranks[rows, j] = torch.where(keep, r, -1)
                    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
                    logprobs[rows, j] = torch.where(keep, capped_t - lse, nan)
                    target_logits[rows, j] = torch.where(keep, capped_t, nan)
    return CellStats(ranks, logprobs, target_logits, entropy, kl)


__all__ = ["CellStats", "cell_stats", "exact_ranks"]
