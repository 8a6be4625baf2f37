"""Ablations: set the activation at named positions to zero or to a reference mean; and the
helpers that compute that mean from a cache, a tensor or streamed residuals."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooks._common import (
    HookFn,
    all_cells,
    as_tensor,
    check_layout,
    parse_positions,
    resolve,
    write_cells,
)


def zero_ablate(positions: int | Iterable[int | tuple[int, int]] | None = None) -> HookFn:
    """Set the activation at ``positions`` to zero (``None``: every position).

    ``positions``: an int, or a list of ints (every row) and ``(batch_idx, pos)`` tuples.
    Returns ``fn(activation: [batch, pos, *trailing], hook) -> [batch, pos, *trailing]`` (a new
    tensor; the input is not modified).

    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[
    ...     ("blocks.4.attn.hook_z", zero_ablate(positions=[3, (0, 5)])),
    ... ])
    """
    keys = parse_positions(positions)

    def hook_fn(activation: Tensor, hook) -> Tensor:
        name = check_layout(activation, hook)
        if keys is None:
            return torch.zeros_like(activation)
        rows, cols, _ = resolve(keys, *activation.shape[:2], name)
        return write_cells(activation, rows, cols, activation.new_zeros(()))

    return hook_fn


def mean_ablate(
    mean: Float[Tensor, "*trailing"] | Float[Tensor, " ref_pos *trailing"],
    positions: int | Iterable[int | tuple[int, int]] | None = None,
) -> HookFn:
    """Set the activation at ``positions`` (``None``: every position) to a reference mean.

    Args:
        mean: ``[*trailing]`` (one mean for every position, e.g. ``[d_model]``) or
            ``[ref_pos, *trailing]`` (a mean per position; position ``p`` gets ``mean[p]``).
            Compute it with :func:`mean_activation` or :func:`mean_from_stream` over a reference
            set of your choice. Moved to the activation's dtype and device.
        positions: an int, or a list of ints (every row) and ``(batch_idx, pos)`` tuples.

    Returns ``fn(activation: [batch, pos, *trailing], hook) -> [batch, pos, *trailing]`` (a new
    tensor; the input is not modified).

    >>> _, cache = model.run_with_cache(reference_tokens, names_filter="blocks.6.hook_resid_post")
    >>> mu = mean_activation(cache, "blocks.6.hook_resid_post")            # [d_model]
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[
    ...     ("blocks.6.hook_resid_post", mean_ablate(mu, positions=[-1])),
    ... ])
    """
    mean = as_tensor(mean, "mean")
    keys = parse_positions(positions)

    def hook_fn(activation: Tensor, hook) -> Tensor:
        name = check_layout(activation, hook)
        batch, n_pos = activation.shape[:2]
        trailing = tuple(activation.shape[2:])
        if keys is None:
            rows, cols = all_cells(batch, n_pos)
        else:
            rows, cols, _ = resolve(keys, batch, n_pos, name)
        if tuple(mean.shape) == trailing:
            values = mean
        elif mean.ndim == len(trailing) + 1 and tuple(mean.shape[1:]) == trailing:
            if max(cols) >= mean.shape[0]:
                raise IndexError(
                    f"{name}: the per-position mean covers positions 0..{mean.shape[0] - 1}, "
                    f"but position {max(cols)} is ablated; use a longer reference set or one "
                    "mean for every position"
                )
            values = mean[torch.tensor(cols, device=mean.device)]
        else:
            raise ValueError(
                f"mean has shape {tuple(mean.shape)}, but {name} activations are "
                f"{tuple(activation.shape)} [batch, pos, ...]: it must be {trailing} or "
                f"[ref_pos, {', '.join(map(str, trailing))}]"
            )
        values = values.to(device=activation.device, dtype=activation.dtype)
        if not torch.isfinite(values).all():
            raise ValueError(
                f"{name}: the mean is not finite at an ablated position (a per-position mean is "
                "NaN where the reference set had no token at that position)"
            )
        return write_cells(activation, rows, cols, values)

    return hook_fn


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

    >>> mu = mean_from_stream(bt.stream_residuals(model, bt.wiki_texts(200), layers=[6]), 6)
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
