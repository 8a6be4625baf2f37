"""Steering: add a vector to the activation."""

from __future__ import annotations

from collections.abc import Iterable

from jaxtyping import Float
from torch import Tensor

from beyond_top1.hooks._common import (
    HookFn,
    as_tensor,
    check_layout,
    fit_vector,
    parse_positions,
    read_cells,
    resolve,
    write_cells,
)


def add_vector(
    vector: Float[Tensor, "*trailing"],
    positions: int | Iterable[int | tuple[int, int]] | None = None,
    *,
    scale: float = 1.0,
) -> HookFn:
    """Add ``scale * vector`` to the activation at ``positions`` (``None``: every position).

    Args:
        vector: the activation's trailing shape (``[d_model]`` for resid hooks,
            ``[n_heads, d_head]`` for ``attn.hook_z``); moved to its dtype and device. It may
            require grad (the returned activation then depends on it).
        positions: ``None``, an int, or a list of ints (every row) and ``(batch_idx, pos)``
            tuples (one row); negative values count from the end.
        scale: multiplier.

    Returns ``fn(activation: [batch, pos, *trailing], hook) -> [batch, pos, *trailing]`` (a new
    tensor; the input is not modified).

    >>> steer = mean_resid_a - mean_resid_b                       # [d_model]
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[
    ...     ("blocks.8.hook_resid_post", add_vector(steer, positions=[-1], scale=4.0)),
    ... ])
    """
    vector = as_tensor(vector, "vector")
    keys = parse_positions(positions)
    scale = float(scale)

    def hook_fn(activation: Tensor, hook) -> Tensor:
        name = check_layout(activation, hook)
        delta = scale * fit_vector(vector, activation, name, "vector")
        if keys is None:
            return activation + delta
        rows, cols, _ = resolve(keys, *activation.shape[:2], name)
        return write_cells(activation, rows, cols, read_cells(activation, rows, cols) + delta)

    return hook_fn
