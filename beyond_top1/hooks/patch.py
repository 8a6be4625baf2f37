"""Activation patching: replace the activation at named positions, or copy one position's
activation into another within the same forward pass.

Position keys: ``pos`` (an int) applies to every batch row, ``(batch_idx, pos)`` to one row;
negative values count from the end. Only the named cells change; the hook returns a new tensor
and never writes into the activation it was given.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1.hooks._common import (
    HookFn,
    Key,
    as_tensor,
    check_layout,
    fit_vector,
    parse_key,
    read_cells,
    resolve,
    write_cells,
)


def replace_at_positions(
    vectors: Mapping[int | tuple[int, int], Float[Tensor, "*trailing"]],
) -> HookFn:
    """Replace the activation at the given positions with the given vectors.

    Args:
        vectors: ``{pos: vec}`` sets position ``pos`` of every batch row to ``vec``;
            ``{(batch_idx, pos): vec}`` sets one row's position. ``vec`` has the activation's
            trailing shape: ``[d_model]`` for resid hooks, ``[n_heads, d_head]`` for
            ``attn.hook_z``, ``[d_mlp]`` for ``mlp.hook_post``. For a ``pos`` key it may also be
            ``[batch, *trailing]``: one vector per row. Vectors are moved to the activation's
            dtype and device.

    Returns:
        ``fn(activation: [batch, pos, *trailing], hook) -> [batch, pos, *trailing]``, a copy
        with only the named cells replaced.

    >>> vec = cache["blocks.12.hook_resid_post"][0, 3]          # [d_model]
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[
    ...     ("blocks.12.hook_resid_post", replace_at_positions({7: vec, (1, -1): vec})),
    ... ])
    """
    if not isinstance(vectors, Mapping) or not vectors:
        raise TypeError("replace_at_positions takes a non-empty dict {pos or (batch, pos): vector}")
    keys = [parse_key(k) for k in vectors]
    values = [as_tensor(v, f"the vector for position {k!r}") for k, v in vectors.items()]
    labels = [f"the vector for position {k!r}" for k in vectors]

    def hook_fn(activation: Tensor, hook) -> Tensor:
        name = check_layout(activation, hook)
        batch, n_pos = activation.shape[:2]
        rows, cols, owner = resolve(keys, batch, n_pos, name)
        fitted = [
            fit_vector(v, activation, name, label, per_row=key[0] is None)
            for key, v, label in zip(keys, values, labels, strict=True)
        ]
        n_trailing = activation.ndim - 2
        cell_values = torch.stack(
            [
                fitted[i] if fitted[i].ndim == n_trailing else fitted[i][row]
                for row, i in zip(rows, owner, strict=True)
            ]
        )
        return write_cells(activation, rows, cols, cell_values)

    return hook_fn


def copy_positions(
    targets: Mapping[int | tuple[int, int], int | tuple[int, int]],
) -> HookFn:
    """Copy activations between positions of the same forward pass: ``{target: source}``.

    Keys and values are ``pos`` or ``(batch_idx, pos)``:

    - ``{t: s}``: in every row, position ``t`` gets that row's position ``s``;
    - ``{(b, t): s}``: row ``b``'s position ``t`` gets row ``b``'s position ``s``;
    - ``{(b, t): (b2, s)}``: row ``b``'s position ``t`` gets row ``b2``'s position ``s``;
    - ``{t: (b2, s)}``: position ``t`` of every row gets row ``b2``'s position ``s``.

    Sources are read from the activation as it arrived (before any target is written), so
    ``{3: 2, 2: 1}`` puts the original position 2 into 3. Only the targets change.

    Returns ``fn(activation: [batch, pos, *trailing], hook) -> [batch, pos, *trailing]`` (a copy).

    >>> hook = copy_positions({(0, 20): (0, 12), (1, 9): (1, 4)})   # a batch of two pairs
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.12.hook_resid_post", hook)])
    """
    if not isinstance(targets, Mapping) or not targets:
        raise TypeError("copy_positions takes a non-empty dict {target: source}")
    pairs: list[tuple[Key, Key]] = [(parse_key(t), parse_key(s)) for t, s in targets.items()]
    target_keys = [t for t, _ in pairs]

    def hook_fn(activation: Tensor, hook) -> Tensor:
        name = check_layout(activation, hook)
        batch, n_pos = activation.shape[:2]
        rows, cols, owner = resolve(target_keys, batch, n_pos, name)
        src_rows, src_cols = [], []
        for row, i in zip(rows, owner, strict=True):
            src_b, src_p = pairs[i][1]
            key = (row if src_b is None else src_b, src_p)
            (r,), (c,), _ = resolve([key], batch, n_pos, name)
            src_rows.append(r)
            src_cols.append(c)
        return write_cells(activation, rows, cols, read_cells(activation, src_rows, src_cols))

    return hook_fn


def copy_position(source: int | tuple[int, int], target: int | tuple[int, int]) -> HookFn:
    """Copy the activation at position ``source`` into position ``target`` (same pass, same
    hook point); nothing else changes. ``copy_position(s, t)`` is ``copy_positions({t: s})``.

    This is the task-shift intervention of docs/definitions.md: the target's ``resid_post`` at layer
    ``l`` is replaced by the earlier-saturating source's, at the same layer of the same text.

    ``source``/``target``: ``pos`` (every row) or ``(batch_idx, pos)``; see :func:`copy_positions`.

    >>> l = 12
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[
    ...     (f"blocks.{l}.hook_resid_post", copy_position(source=5, target=17)),
    ... ])
    """
    return copy_positions({target: source})
