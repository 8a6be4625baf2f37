"""Lens quality metrics, streamed over a corpus (docs/definitions.md, "Lens metrics"; 004 §3-§4).

:func:`evaluate_lenses` scores lenses layer by layer against the model's own final distribution
``p_final`` (the logit lens at ``L-1``, i.e. the model's logits). :func:`quality_of_fit_matrix`
reproduces 004's Fig. 2: r² of least-squares maps ``l -> l'`` against the identity baseline.

Both make one pass over their texts and accumulate float64 sums, so their memory does not grow
with the number of tokens and the results do not depend on the batch size (up to rounding).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import distributed, hooked
from beyond_top1.activations import resolve_layers, stream_residuals
from beyond_top1.data import DEFAULT_SCORE_FIRST
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.least_squares import DEFAULT_RIDGE, LeastSquaresAccumulator
from beyond_top1.lenses.logit import LogitLens

PRECISION_KS = (1, 5, 10)
LENS_METRICS = (
    "r2",
    *(f"precision_at_{k}" for k in PRECISION_KS),
    "surprisal",
    "kl",
    "cross_entropy",
)


# ---------------------------------------------------------------------------------------------
# Streaming r²
# ---------------------------------------------------------------------------------------------


class Moments:
    """Per-coordinate count, mean and centred sum of squares, merged batch by batch (float64).

    Chan et al.'s pairwise update, so ``ss_tot`` is exact however the tokens are batched.
    """

    def __init__(self):
        self.n = 0
        self.mean: Tensor | None = None
        self.ss_tot: Tensor | None = None

    def update(self, y: Float[Tensor, "tokens d"]) -> None:
        n_b = y.shape[0]
        if n_b == 0:
            return
        y = y.double()
        mean_b = y.mean(0)
        self._merge(n_b, mean_b, (y - mean_b).pow(2).sum(0))

    def _merge(self, n_b: int, mean_b: Tensor, ss_b: Tensor) -> None:
        if n_b == 0:
            return
        if self.mean is None:
            self.mean, self.ss_tot = mean_b, ss_b
        else:
            n = self.n + n_b
            delta = mean_b.to(self.mean.device) - self.mean
            self.mean = self.mean + delta * (n_b / n)
            self.ss_tot = (
                self.ss_tot + ss_b.to(self.mean.device) + delta.pow(2) * (self.n * n_b / n)
            )
        self.n += n_b

    def all_reduce(self, where=None) -> Moments:
        """Merge every ``torchrun`` rank's moments, in rank order, on every rank."""
        where = where or distributed.ranks()
        if not where.active:
            return self
        mine = (self.n, None if self.mean is None else (self.mean.cpu(), self.ss_tot.cpu()))
        merged = Moments()
        for n, moments in distributed.all_gather(mine, where):
            if moments is not None:
                merged._merge(n, *moments)
        device = None if self.mean is None else self.mean.device
        self.n, self.mean, self.ss_tot = merged.n, merged.mean, merged.ss_tot
        if device is not None and self.mean is not None:
            self.mean, self.ss_tot = self.mean.to(device), self.ss_tot.to(device)
        return self


def squared_error(pred: Float[Tensor, "tokens d"], y: Float[Tensor, "tokens d"]) -> Tensor:
    """Per-coordinate sum of squared residuals, float64: ``[d]``."""
    return (pred.double() - y.double()).pow(2).sum(0)


def coordinate_r2(ss_res: Float[Tensor, " d"], ss_tot: Float[Tensor, " d"]) -> float:
    """Mean over coordinates of ``1 - SS_res / SS_tot``.

    A constant coordinate (``SS_tot = 0``) scores 1 if fitted exactly and 0 otherwise, as in
    ``sklearn.metrics.r2_score(multioutput="uniform_average")``.
    """
    ss_res, ss_tot = torch.as_tensor(ss_res).cpu(), ss_tot.cpu()
    exact = (ss_res == 0).double()
    scores = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), exact)
    return float(scores.mean())


# ---------------------------------------------------------------------------------------------
# evaluate_lenses
# ---------------------------------------------------------------------------------------------


class _FinalDistribution:
    """The model's final distribution over one batch: log-probs, probs and top-k ids."""

    def __init__(self, logits: Float[Tensor, "tokens vocab"]):
        self.log_probs = logits.float().log_softmax(-1)
        self.probs = self.log_probs.exp()
        k = min(max(PRECISION_KS), logits.shape[-1])
        self.top_ids: Int[Tensor, "tokens k"] = logits.topk(k, dim=-1).indices


class _LensTotals:
    """Sums of every metric for one (lens, layer), float64."""

    def __init__(self):
        self.n = 0
        self.n_next = 0
        self.ss_res: Tensor | float = 0.0
        self.hits = torch.zeros(len(PRECISION_KS), dtype=torch.float64)
        self.surprisal = 0.0
        self.kl = 0.0
        self.cross_entropy = 0.0

    def update(
        self,
        lens: Lens,
        layer: int,
        resid: Float[Tensor, "tokens d_model"],
        target: Float[Tensor, "tokens d_model"],
        final: _FinalDistribution,
        next_ids: Int[Tensor, " tokens"],
    ) -> None:
        self.n += resid.shape[0]
        self.ss_res = self.ss_res + squared_error(lens.transform(resid, layer), target)
        log_q = lens(resid, layer).float().log_softmax(-1)
        top1 = log_q.argmax(-1, keepdim=True)
        in_top = final.top_ids == top1
        self.hits += torch.stack([in_top[:, :k].any(-1).sum() for k in PRECISION_KS]).cpu()
        self.surprisal -= _total(final.log_probs.gather(-1, top1))
        self.kl += _total(torch.linalg.vecdot(final.probs, final.log_probs - log_q))
        has_next = next_ids >= 0
        gold = log_q.gather(-1, next_ids.clamp_min(0)[:, None])[:, 0]
        self.cross_entropy -= _total(gold[has_next])
        self.n_next += int(has_next.sum())

    def all_reduce(self, where=None) -> _LensTotals:
        """Sum every ``torchrun`` rank's totals (float64), on every rank."""
        where = where or distributed.ranks()
        if not where.active:
            return self
        scalars = [self.n, self.n_next, self.surprisal, self.kl, self.cross_entropy]
        packed = torch.tensor(scalars, dtype=torch.float64)
        packed = torch.cat(
            [packed, self.hits, torch.as_tensor(self.ss_res).double().cpu().flatten()]
        )
        sizes = distributed.all_gather(packed.numel(), where)
        if len(set(sizes)) != 1:  # a rank with no tokens has a scalar ss_res: pad to [d]
            width = max(sizes)
            packed = torch.cat([packed, torch.zeros(width - packed.numel(), dtype=packed.dtype)])
        distributed.all_reduce_sum(packed, where)
        n, n_next = int(packed[0]), int(packed[1])
        self.n, self.n_next = n, n_next
        self.surprisal, self.kl, self.cross_entropy = (float(v) for v in packed[2:5])
        k = len(PRECISION_KS)
        self.hits = packed[5 : 5 + k].clone()
        self.ss_res = packed[5 + k :].clone()
        return self

    def row(self, ss_tot: Tensor) -> dict:
        n, n_next = self.n, self.n_next
        hits = zip(PRECISION_KS, self.hits.tolist(), strict=True)
        precision = {f"precision_at_{k}": h / n for k, h in hits}
        return {
            "n_tokens": n,
            "r2": coordinate_r2(self.ss_res, ss_tot),
            **precision,
            "surprisal": self.surprisal / n,
            "kl": self.kl / n,
            "cross_entropy": self.cross_entropy / n_next if n_next else float("nan"),
            "n_next_tokens": n_next,
        }


def _total(values: Tensor) -> float:
    return float(values.double().sum())


def _named_lenses(lenses: Mapping[str, Lens] | Sequence[Lens]) -> dict[str, Lens]:
    if isinstance(lenses, Mapping):
        named = dict(lenses)
    else:
        named = {}
        for lens in lenses:
            if lens.kind in named:
                raise ValueError(f"two lenses of kind {lens.kind!r}: pass a dict name -> lens")
            named[lens.kind] = lens
    if not named:
        raise ValueError("no lenses given")
    return named


def _layer_plan(
    model, lenses: dict[str, Lens], layers: Sequence[int] | None
) -> dict[str, tuple[int, ...]]:
    """The layers to score for each lens: the requested ones it reads (default: all in 0..L-1)."""
    if layers is None:
        L = hooked.n_layers(model)
        return {name: tuple(l for l in lens.layers if 0 <= l < L) for name, lens in lenses.items()}
    wanted = resolve_layers(model, layers)
    plan = {name: tuple(l for l in wanted if l in lens.layers) for name, lens in lenses.items()}
    unread = sorted(set(wanted) - {l for ls in plan.values() for l in ls})
    if unread:
        raise ValueError(f"no lens reads layer(s) {unread}")
    return plan


def evaluate_lenses(
    model,
    lenses: Mapping[str, Lens] | Sequence[Lens],
    texts: Iterable[str],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> pd.DataFrame:
    """Score lenses layer by layer against the model's final distribution, in one pass.

    Args:
        lenses: ``name -> lens``, or a sequence of lenses named by their ``kind``.
        texts: streamed once (one forward pass per batch caches every layer needed).
        layers: layers to score (default: every layer ``0..L-1`` each lens reads); a lens is
            scored at the requested layers it reads.

    Returns:
        One row per (lens, layer), averaged over the scored tokens: ``lens, layer, n_tokens, r2,
        precision_at_1, precision_at_5, precision_at_10, surprisal, kl, cross_entropy,
        n_next_tokens``. ``r2`` is the coordinate-averaged r² of ``lens.transform(h_l)`` against
        ``h_{L-1}``; ``precision_at_k`` whether the lens' top-1 is in the final top-k;
        ``surprisal`` is ``-log p_final(lens top-1)``; ``kl`` is ``KL(p_final ‖ p_lens)``; all
        in nats. ``cross_entropy`` (``-log p_lens(next token)``) averages only over the
        ``n_next_tokens`` positions that have a next token (the last token of a text has none).
    """
    named = _named_lenses(lenses)
    plan = _layer_plan(model, named, layers)
    last = hooked.n_layers(model) - 1
    streamed = sorted({l for ls in plan.values() for l in ls} | {last})
    final_lens = LogitLens(model)
    target = Moments()
    totals = {(name, l): _LensTotals() for name, ls in plan.items() for l in ls}
    where = distributed.ranks()  # under torchrun: this rank's batches, then sums all-reduced
    stream = {"batch_size": batch_size, "max_len": max_len, "progress": progress}
    stream["score_first"] = score_first
    batches = stream_residuals(model, texts, layers=streamed, **distributed.sharded(stream, where))

    def accumulate() -> None:
        with torch.inference_mode():
            for batch in batches:
                y = batch.at(last)
                target.update(y)
                final = _FinalDistribution(final_lens(y, last))
                for name, layer in totals:
                    totals[name, layer].update(
                        named[name], layer, batch.at(layer), y, final, batch.next_token_ids
                    )
                del final

    distributed.run_checked(accumulate, where)
    target.all_reduce(where)
    for entry in totals.values():
        entry.all_reduce(where)
    if target.n == 0:
        raise ValueError("the texts have no scored tokens")
    rows = [{"lens": n, "layer": l, **t.row(target.ss_tot)} for (n, l), t in totals.items()]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# quality_of_fit_matrix
# ---------------------------------------------------------------------------------------------


def _fit_pair_maps(
    model, texts, layers: tuple[int, ...], *, bias: bool, ridge: float, **stream
) -> list[tuple[Tensor, Tensor | None]]:
    """Least-squares maps from each source ``layers[i]`` to every later layer, fitted at once.

    The targets are concatenated, ``[h_{l_{i+1}}, ..., h_{l_last}]``, so ``XᵀX`` is stored once
    per source and ``XᵀY`` once per pair: the upper block triangle of the joint Gram matrix.
    """
    d = hooked.d_model(model)
    n = len(layers)
    device = hooked.model_device(model)
    accumulators = [
        LeastSquaresAccumulator(d, d * (n - 1 - i), bias=bias, device=device) for i in range(n - 1)
    ]
    where = distributed.ranks()

    def accumulate() -> None:
        for batch in stream_residuals(
            model, texts, layers=layers, **distributed.sharded(stream, where)
        ):
            for i, acc in enumerate(accumulators):
                acc.update(batch.resid[:, i], batch.resid[:, i + 1 :].flatten(1))

    distributed.run_checked(accumulate, where)
    maps = []
    while accumulators:  # free each Gram matrix as soon as it is solved
        maps.append(accumulators.pop(0).all_reduce(where).solve(ridge))
    return maps


def quality_of_fit_matrix(
    model,
    train_texts: Iterable[str],
    val_texts: Iterable[str],
    *,
    layers: Sequence[int] | None = None,
    bias: bool = False,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> pd.DataFrame:
    """r² of linear maps ``l -> l'`` and of the identity, for every pair ``l < l'`` (004 Fig. 2).

    The maps are fitted by least squares on ``train_texts`` (normal equations accumulated in
    float64, so memory is independent of the number of tokens: ``XᵀX`` per source layer and
    ``XᵀY`` per pair, about ``(n_pairs + n_layers) · d_model² · 8`` bytes, 1.2 GB for all 30
    layers of SmolLM2) and evaluated on ``val_texts``. Pass a ``layers`` subset to keep that
    cheap. ``bias`` and ``ridge`` (relative to the mean diagonal of ``XᵀX``) are as in
    :meth:`~beyond_top1.lenses.linear.LinearShortcutLens.fit`.

    Returns:
        One row per pair: ``source, target, r2_linear, r2_identity`` (coordinate-averaged r² of
        ``h_source A`` and of ``h_source`` against ``h_target`` on the validation texts).
    """
    layers = tuple(sorted(set(resolve_layers(model, layers))))
    if len(layers) < 2:
        raise ValueError(f"need at least two layers, got {layers}")
    stream = {"batch_size": batch_size, "max_len": max_len, "progress": progress}
    stream["score_first"] = score_first
    with torch.inference_mode():
        maps = _fit_pair_maps(model, train_texts, layers, bias=bias, ridge=ridge, **stream)
        errors = _validation_errors(model, val_texts, layers, maps, **stream)
    ss_linear, ss_identity, moments = errors
    rows = []
    for i, source in enumerate(layers[:-1]):
        for j, target in enumerate(layers[i + 1 :]):
            ss_tot = moments[i + 1 + j].ss_tot
            rows.append(
                {
                    "source": source,
                    "target": target,
                    "r2_linear": coordinate_r2(ss_linear[i][j], ss_tot),
                    "r2_identity": coordinate_r2(ss_identity[i][j], ss_tot),
                }
            )
    return pd.DataFrame(rows)


def _validation_errors(model, texts, layers, maps, **stream):
    """Per-pair squared errors of the maps and of the identity, and per-layer moments."""
    moments = [Moments() for _ in layers]
    d = hooked.d_model(model)
    device = hooked.model_device(model)
    ss_linear = [
        torch.zeros(len(layers) - 1 - i, d, dtype=torch.float64, device=device)
        for i in range(len(maps))
    ]
    ss_identity = [torch.zeros_like(ss) for ss in ss_linear]
    where = distributed.ranks()

    def accumulate() -> None:
        for batch in stream_residuals(
            model, texts, layers=layers, **distributed.sharded(stream, where)
        ):
            for i, moment in enumerate(moments):
                moment.update(batch.resid[:, i])
            for i, (weight, offset) in enumerate(maps):
                x = batch.resid[:, i].double()
                y = batch.resid[:, i + 1 :].double()
                pred = (x @ weight if offset is None else x @ weight + offset).view_as(y)
                ss_linear[i] += (pred - y).pow(2).sum(0)
                ss_identity[i] += (x[:, None] - y).pow(2).sum(0)

    distributed.run_checked(accumulate, where)
    for total in (*ss_linear, *ss_identity):
        distributed.all_reduce_sum(total, where)
    for moment in moments:
        moment.all_reduce(where)
    if moments[0].n == 0:
        raise ValueError("the validation texts have no scored tokens")
    return ss_linear, ss_identity, moments


__all__ = [
    "LENS_METRICS",
    "Moments",
    "coordinate_r2",
    "evaluate_lenses",
    "quality_of_fit_matrix",
    "squared_error",
]
