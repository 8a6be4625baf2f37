"""Hooks that save activations and change nothing (they return ``None``)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from beyond_top1.hooks._common import (
    HookFn,
    check_layout,
    hook_name,
    parse_positions,
    read_cells,
    resolve,
)


def record(store: dict[str, Tensor], *, detach: bool = True) -> HookFn:
    """Save each activation under its hook name into ``store``.

    With ``detach=True`` (default) the stored tensor is a detached copy; with ``detach=False``
    it is the activation itself (keeps the autograd graph; later in-place edits would show).

    >>> store = {}
    >>> model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_resid_post", record(store))])
    >>> store["blocks.3.hook_resid_post"].shape  # [batch, pos, d_model]
    """

    def hook_fn(activation: Tensor, hook) -> None:
        store[hook_name(hook)] = activation.detach().clone() if detach else activation

    return hook_fn


def record_positions(
    store: dict[str, Tensor],
    positions: int | Iterable[int | tuple[int, int]],
    *,
    detach: bool = True,
) -> HookFn:
    """Save the activation at some positions only, under the hook's name in ``store``.

    ``positions``: ints (every row) → ``store[name]`` is ``[batch, n_positions, ...]``;
    ``(batch_idx, pos)`` tuples → ``[n_cells, ...]`` in the order given. Don't mix the two.

    >>> store = {}
    >>> model.run_with_hooks(
    ...     tokens, fwd_hooks=[("blocks.3.hook_resid_post", record_positions(store, [-1]))]
    ... )
    >>> store["blocks.3.hook_resid_post"].shape  # [batch, 1, d_model]
    """
    keys = parse_positions(positions)
    if keys is None:
        raise ValueError("record_positions needs positions; use record(store) for all of them")
    per_row = {b is None for b, _ in keys}
    if len(per_row) != 1:
        raise ValueError(
            "record_positions: mix of ints (every row) and (batch_idx, pos) tuples; use one kind"
        )
    every_row = per_row == {True}

    def hook_fn(activation: Tensor, hook) -> None:
        name = check_layout(activation, hook)
        batch, n_pos = activation.shape[:2]
        if every_row:
            cols = resolve(keys, 1, n_pos, name)[1]
            saved = activation[:, cols]
        else:
            rows, cols, _ = resolve(keys, batch, n_pos, name)
            saved = read_cells(activation, rows, cols)
        store[name] = saved.detach().clone() if detach else saved

    return hook_fn
