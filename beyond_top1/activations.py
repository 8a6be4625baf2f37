"""Stream residual streams over many texts, one batch at a time.

Every corpus-level analysis reads from :func:`stream_residuals`. It caches only the hooks it
needs (``names_filter``), keeps only the real, scored positions of each batch (padding and
position 0, the BOS or attention-sink token, are dropped before anything is yielded; see
:mod:`beyond_top1.data`), and holds no more than one batch in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.data import DEFAULT_SCORE_FIRST, iter_token_batches
from beyond_top1.progress import tqdm


@dataclass
class ResidualBatch:
    """Residual streams of the scored positions of one batch of texts, flattened to ``tokens``.

    ``resid[:, j]`` is the residual at layer ``layers[j]`` (``-1`` = embedding, ``l`` =
    ``blocks.{l}.hook_resid_post``). ``next_token_ids`` is ``-1`` where the text ends.
    """

    resid: Float[Tensor, "tokens layer d_model"]
    layers: tuple[int, ...]
    token_ids: Int[Tensor, " tokens"]
    next_token_ids: Int[Tensor, " tokens"]
    text_ids: Int[Tensor, " tokens"]
    positions: Int[Tensor, " tokens"]
    batch_index: int

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def at(self, layer: int) -> Float[Tensor, "tokens d_model"]:
        """The residual at one layer (by layer index, not by column)."""
        try:
            return self.resid[:, self.layers.index(layer)]
        except ValueError:
            raise KeyError(f"layer {layer} was not streamed; streamed: {self.layers}") from None


def resolve_layers(model, layers: Sequence[int] | None) -> tuple[int, ...]:
    """``None`` means every ``resid_post`` layer ``0..L-1``; each index is validated."""
    if layers is None:
        return tuple(range(hooked.n_layers(model)))
    resolved = tuple(hooked.check_layer(model, int(l)) for l in layers)
    if not resolved:
        raise ValueError("layers is empty")
    return resolved


def stream_residuals(
    model,
    texts: Iterable[str],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    max_len: int | None = None,
    skip_batches: int = 0,
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
    select: Callable[[int], bool] | None = None,
) -> Iterator[ResidualBatch]:
    """Run ``model`` over ``texts`` in batches and yield residual streams of scored positions.

    Args:
        texts: any iterable of strings; consumed lazily. Texts are truncated to
            ``max_len`` (default 128 tokens, or the model's context if shorter).
        layers: layer indices to cache (``None``: all ``resid_post`` layers; ``-1``: embedding).
        skip_batches: batches to skip without running the model (for resuming a run).
        select: run only the batches whose index it accepts (the others are skipped without
            running the model): a rank's share under ``torchrun``
            (:meth:`beyond_top1.distributed.Ranks.owns`), or the unfinished shards of a run.
        progress: show a tqdm progress bar (counted in texts).
        score_first: score position 0 of a model without BOS (default: not; it is the
            attention sink, see :mod:`beyond_top1.data`).

    Yields:
        :class:`ResidualBatch` per batch, on the model's device.
    """
    layers = resolve_layers(model, layers)
    device = hooked.model_device(model)

    def runs(index: int) -> bool:
        return index >= skip_batches and (select is None or select(index))

    total = len(texts) if hasattr(texts, "__len__") else None
    if total is not None and select is not None:  # the bar counts the texts this call runs
        total = sum(
            min(batch_size, total - start)
            for index, start in enumerate(range(0, total, batch_size))
            if runs(index)
        )
    bar = tqdm(total=total, unit="text", desc="forward", disable=not progress, leave=False)
    try:
        batches = iter_token_batches(
            model, texts, batch_size=batch_size, max_len=max_len, score_first=score_first
        )
        for index, batch in enumerate(batches):
            ran = runs(index)
            if ran or select is None:  # batches skipped on resume count as done
                bar.update(len(batch.text_ids))
            if not ran:
                continue
            tokens = batch.tokens.to(device)
            resid = hooked.run_with_residuals(model, tokens, layers)
            scored = batch.scored.to(device)
            rows, cols = scored.nonzero(as_tuple=True)
            yield ResidualBatch(
                resid=resid[rows, cols],
                layers=layers,
                token_ids=tokens[rows, cols],
                next_token_ids=batch.next_tokens.to(device)[rows, cols],
                text_ids=batch.text_ids.to(device)[rows],
                positions=cols,
                batch_index=index,
            )
            del resid
    finally:
        bar.close()


def count_scored_tokens(
    model,
    texts: Iterable[str],
    *,
    max_len: int | None = None,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> int:
    """Number of positions :func:`stream_residuals` would yield for ``texts`` (tokenizes only)."""
    batches = iter_token_batches(model, texts, max_len=max_len, score_first=score_first)
    return sum(b.n_tokens for b in batches)


# ---------------------------------------------------------------------------------------------
# Reference means (for mean ablation: beyond_top1.hooks.mean_ablate)
# ---------------------------------------------------------------------------------------------


def mean_activation(
    source: Float[Tensor, "batch pos *trailing"] | object,
    hook_name: str | None = None,
    *,
    mask: Bool[Tensor, "batch pos"] | None = None,
    per_position: bool = False,
) -> Float[Tensor, "*trailing"] | Float[Tensor, " pos *trailing"]:
    """Mean of an activation over a reference batch (accumulated in float64).

    Args:
        source: a ``[batch, pos, *trailing]`` tensor, or a cache (``ActivationCache`` or dict)
            with ``hook_name``.
        mask: ``[batch, pos]``, True for the positions to average (e.g. the attention mask, to
            leave padding out); default every position.
        per_position: average over the batch only → ``[pos, *trailing]`` (NaN at positions the
            mask leaves empty); default over batch and positions → ``[*trailing]``.

    >>> _, cache = model.run_with_cache(reference_tokens)
    >>> mu = mean_activation(cache, "blocks.6.hook_resid_post", mask=attention_mask)
    """
    if isinstance(source, Tensor):
        acts = source
    else:
        if hook_name is None:
            raise ValueError("pass hook_name to take the mean from a cache")
        acts = source[hook_name]
    acts = acts.detach()
    if acts.ndim < 2:
        raise ValueError(f"expected a [batch, pos, ...] activation, got {tuple(acts.shape)}")
    if mask is None:
        mask = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
    mask = mask.to(device=acts.device, dtype=torch.bool)
    if tuple(mask.shape) != tuple(acts.shape[:2]):
        raise ValueError(f"mask is {tuple(mask.shape)}, activations are {tuple(acts.shape)}")
    weights = mask.to(torch.float64).reshape(*mask.shape, *([1] * (acts.ndim - 2)))
    sums = (acts.to(torch.float64) * weights).sum(dim=0)
    counts = weights.sum(dim=0)
    if not per_position:
        sums, counts = sums.sum(dim=0), counts.sum(dim=0)
        if counts.item() == 0:
            raise ValueError("mask selects no position")
    return (sums / counts).to(acts.dtype)  # 0/0 = NaN at empty positions


def mean_from_stream(
    batches: Iterable,
    layer: int,
    *,
    per_position: bool = False,
) -> Float[Tensor, " d_model"] | Float[Tensor, "pos d_model"]:
    """Mean residual at ``layer`` over streamed batches (float64 accumulation, one batch held).

    ``batches``: :class:`beyond_top1.ResidualBatch` objects (anything with ``.at(layer)`` →
    ``[tokens, d_model]`` and ``.positions`` → ``[tokens]``), e.g.
    ``bt.stream_residuals(model, texts, layers=[layer])``. Padding and position 0 are already
    left out.
    ``per_position``: ``[max_pos + 1, d_model]``, NaN where no token was seen.

    >>> mu = mean_from_stream(stream_residuals(model, bt.wiki_texts(200), layers=[6]), 6)
    >>> hook = ("blocks.6.hook_resid_post", mean_ablate(mu, positions=[-1]))
    """
    sums = counts = None
    dtype = None
    for batch in batches:
        resid = batch.at(layer).detach()
        dtype = resid.dtype
        resid = resid.to(torch.float64)
        if per_position:
            pos = batch.positions.to(resid.device, torch.long)
            size = int(pos.max()) + 1 if len(pos) else 0
            if sums is None:
                sums = resid.new_zeros(0, resid.shape[-1])
                counts = resid.new_zeros(0)
            if size > len(counts):
                sums = torch.cat([sums, sums.new_zeros(size - len(sums), sums.shape[-1])])
                counts = torch.cat([counts, counts.new_zeros(size - len(counts))])
            sums.index_add_(0, pos, resid)
            counts.index_add_(0, pos, torch.ones_like(pos, dtype=torch.float64))
        else:
            sums = resid.sum(dim=0) if sums is None else sums + resid.sum(dim=0)
            counts = (0 if counts is None else counts) + resid.shape[0]
    if sums is None or (not per_position and counts == 0):
        raise ValueError("no tokens in batches")
    if per_position:
        return (sums / counts[:, None]).to(dtype)
    return (sums / counts).to(dtype)
