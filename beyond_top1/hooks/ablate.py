"""Ablations: set the activation at named positions to zero or to a reference mean (compute the
mean with :func:`beyond_top1.activations.mean_activation` or
:func:`~beyond_top1.activations.mean_from_stream`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1.hooks._common import (
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
            Compute it with ``beyond_top1.activations.mean_activation`` or ``mean_from_stream``
            over a reference set of your choice. Moved to the activation's dtype and device.
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


__all__ = ["mean_ablate", "zero_ablate"]
