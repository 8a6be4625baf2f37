"""Patched forward passes: copy one position's ``resid_post`` into another's and read the
target at every layer, by re-running the text (:func:`patch_and_read`) or by running only the
target token on the unpatched keys and values (:func:`patch_and_read_cached`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.hooks import (
    copy_positions,
    patched,
    record,
    record_positions,
    replace_at_positions,
)


def patch_and_read(
    model,
    tokens: Int[Tensor, "batch pos"],
    read_pos: Sequence[int],
    patches: Sequence[tuple[int, int, int]] = (),
) -> Float[Tensor, "batch layer d_model"]:
    """Run ``tokens`` with within-row patches and read one position per row at every layer.

    Args:
        tokens: right-padded token ids.
        read_pos: the position to read in each row (the target).
        patches: ``(layer, target_pos, source_pos)`` per row (``len(patches) == batch`` rows,
            or empty for an unpatched run): row ``b``'s ``resid_post`` at ``target_pos`` and
            ``layer`` is replaced by the same row's ``resid_post`` at ``source_pos`` (as it
            arrived at that hook), and nothing else changes.

    Returns:
        ``[batch, L, d_model]`` ``resid_post`` of each row's ``read_pos`` at layers ``0..L-1``,
        after the patch.
    """
    batch = tokens.shape[0]
    if len(read_pos) != batch or (patches and len(patches) != batch):
        raise ValueError("give one read position (and one patch, if any) per batch row")
    L = hooked.n_layers(model)
    by_layer: dict[int, dict] = {}
    for row, (layer, target, source) in enumerate(patches):
        if not 0 <= layer < L:
            raise ValueError(f"patch layer {layer} outside [0, {L - 1}]")
        by_layer.setdefault(int(layer), {})[(row, int(target))] = (row, int(source))
    cells = [(row, int(p)) for row, p in enumerate(read_pos)]
    store: dict[str, Tensor] = {}
    fwd = []
    for layer in range(L):
        name = hooked.resid_hook_name(layer)
        if layer in by_layer:
            fwd.append((name, copy_positions(by_layer[layer])))
        fwd.append((name, record_positions(store, cells)))  # sees the patched activation
    with patched(model, fwd):
        hooked.run_forward(model, tokens)
    return torch.stack([store[hooked.resid_hook_name(l)] for l in range(L)], dim=1)


@dataclass
class TextStates:
    """The unpatched run of one text: per-layer (pre-rotary) keys and values
    ``[pos, kv_heads, d_head]`` and ``resid_post`` ``[pos, L, d_model]`` at every position."""

    token_ids: list[int]
    keys: list[Tensor]
    values: list[Tensor]
    resid: Float[Tensor, "pos layer d_model"]


def text_states(model, token_lists: Sequence[Sequence[int]]) -> list[TextStates]:
    """Run whole texts once (right-padded, with their attention mask) and keep their states."""
    L = hooked.n_layers(model)
    device = hooked.model_device(model)
    lengths = [len(ids) for ids in token_lists]
    tokens = torch.zeros((len(token_lists), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for row, ids in enumerate(token_lists):
        tokens[row, : len(ids)] = torch.as_tensor(list(ids))
        mask[row, : len(ids)] = 1
    cache = hooked.kv_cache(model, batch_size=len(token_lists))
    store: dict[str, Tensor] = {}
    fwd = [(hooked.resid_hook_name(l), record(store)) for l in range(L)]
    with patched(model, fwd):
        hooked.run_forward(
            model, tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache
        )
    keys, values = hooked.kv_tensors(cache)
    resid = torch.stack([store[hooked.resid_hook_name(l)] for l in range(L)], dim=2)
    return [
        TextStates(
            list(ids),
            [k[row, :n] for k in keys],
            [v[row, :n] for v in values],
            resid[row, :n],
        )
        for row, (ids, n) in enumerate(zip(token_lists, lengths, strict=True))
    ]


def patch_and_read_cached(
    model,
    states: Sequence[TextStates],
    targets: Sequence[int],
    patches: Sequence[tuple[int, int] | None],
) -> Float[Tensor, "batch layer d_model"]:
    """The same experiment as :func:`patch_and_read`, computing only the target positions.

    Row ``b`` continues text ``states[b]`` at position ``targets[b]``: the keys and values of
    the positions before it come from the unpatched run (a patch at the target cannot change
    them: the model is causal), so only the target token is run, through every layer.
    ``patches[b] = (layer, from_pos)`` replaces the target's ``resid_post`` at ``layer`` with
    the unpatched ``resid_post`` of ``from_pos`` at that layer (``from_pos == targets[b]``: the
    target's own activation in this run, copied in place, an exact no-op); ``None``: no patch.

    Returns ``[batch, L, d_model]``: the target's ``resid_post`` at every layer.
    """
    batch = len(states)
    if len(targets) != batch or len(patches) != batch:
        raise ValueError("give one target and one patch (or None) per row")
    L = hooked.n_layers(model)
    device = hooked.model_device(model)
    width = max(int(t) for t in targets)
    keys = [torch.zeros((batch, width, *k.shape[1:]), dtype=k.dtype) for k in states[0].keys]
    values = [torch.zeros_like(k) for k in keys]
    mask = torch.zeros((batch, width), dtype=torch.long)
    tokens = torch.zeros((batch, 1), dtype=torch.long)
    replace: dict[int, dict] = {}
    copy: dict[int, dict] = {}
    for row, (state, target, patch) in enumerate(zip(states, targets, patches, strict=True)):
        target = int(target)
        if not 0 <= target < len(state.token_ids):
            raise IndexError(
                f"row {row}: target {target} outside the text's {len(state.token_ids)} tokens"
            )
        if target:
            for layer in range(L):
                keys[layer][row, width - target :] = state.keys[layer][:target]
                values[layer][row, width - target :] = state.values[layer][:target]
            mask[row, width - target :] = 1
        tokens[row, 0] = state.token_ids[target]
        if patch is None:
            continue
        layer, source = int(patch[0]), int(patch[1])
        if not 0 <= layer < L:
            raise ValueError(f"patch layer {layer} outside [0, {L - 1}]")
        if source == target:
            copy.setdefault(layer, {})[(row, 0)] = (row, 0)
        else:
            replace.setdefault(layer, {})[(row, 0)] = state.resid[source, layer]
    cache = hooked.kv_cache(
        model,
        [k.to(device) for k in keys],
        [v.to(device) for v in values],
        mask.to(device),
    )
    cells = [(row, 0) for row in range(batch)]
    store: dict[str, Tensor] = {}
    fwd = []
    for layer in range(L):
        name = hooked.resid_hook_name(layer)
        if layer in replace:
            fwd.append((name, replace_at_positions(replace[layer])))
        if layer in copy:
            fwd.append((name, copy_positions(copy[layer])))
        fwd.append((name, record_positions(store, cells)))  # sees the patched activation
    with patched(model, fwd):
        hooked.run_forward(model, tokens.to(device), past_kv_cache=cache)
    return torch.stack([store[hooked.resid_hook_name(l)] for l in range(L)], dim=1)


__all__ = ["TextStates", "patch_and_read", "patch_and_read_cached", "text_states"]
