"""Shared pieces of the hook factories: position keys, range and shape checks.

Positions index axis 1 of ``[batch, pos, ...]`` activations (``hook_resid_*``, ``hook_embed``,
``attn.hook_z/q/k/v/result``, ``mlp.hook_pre/post``, ``ln*.hook_scale`` ...). A *position key*
is either an ``int`` (that position in every batch row) or a ``(batch_idx, pos)`` tuple (one
row). Negative values count from the end, as in Python.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

HookFn = Callable[[Tensor, object], "Tensor | None"]
"""A TransformerLens hook function: ``fn(activation, hook) -> activation | None``."""

# A parsed position key: (batch index, or None for every row; position).
Key = tuple["int | None", int]

_QUERY_KEY_HOOKS = ("hook_pattern", "hook_attn_scores")


# TransformerLens 4's bridge names the block's input and output hooks ``blocks.{l}.hook_in`` /
# ``hook_out`` and keeps HookedTransformer's names as aliases; a hook function is handed the
# hook point under its own name. Stores are keyed by the HookedTransformer name on both lines.
_BRIDGE_BLOCK_NAMES = re.compile(r"^(blocks\.\d+)\.hook_(in|out)$")


def hook_name(hook) -> str:
    """The hook's name as HookedTransformer spells it (the name users register)."""
    name = str(getattr(hook, "name", None) or "<unnamed hook>")
    match = _BRIDGE_BLOCK_NAMES.match(name)
    if match:
        return f"{match[1]}.hook_resid_{'pre' if match[2] == 'in' else 'post'}"
    return name


def check_layout(activation: Tensor, hook) -> str:
    """The hook's name, after checking the activation is ``[batch, pos, ...]``."""
    name = hook_name(hook)
    if name.endswith(_QUERY_KEY_HOOKS):
        raise ValueError(
            f"{name} is [batch, head, query_pos, key_pos], but these factories index positions on "
            "axis 1 of [batch, pos, ...] activations (resid, z, q/k/v, mlp). Hook "
            "blocks.{l}.attn.hook_z or a resid hook instead, or write your own hook function."
        )
    if activation.ndim < 2:
        raise ValueError(
            f"{name}: expected a [batch, pos, ...] activation, got shape {tuple(activation.shape)}"
        )
    return name


def _index(value, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{what} must be an int or a (batch_idx, pos) tuple of ints, got {value!r}"
        ) from None


def parse_key(key) -> Key:
    """``int`` → ``(None, pos)``; ``(b, pos)`` → ``(b, pos)``."""
    if isinstance(key, tuple):
        if len(key) != 2:
            raise TypeError(f"a position key is an int or a (batch_idx, pos) pair, got {key!r}")
        return _index(key[0], "batch_idx"), _index(key[1], "pos")
    if isinstance(key, Tensor) and key.ndim == 1 and key.numel() == 2:
        return _index(key[0], "batch_idx"), _index(key[1], "pos")
    return None, _index(key, "position")


def parse_positions(positions) -> list[Key] | None:
    """``None`` (every position), an int, or an iterable of ints / ``(b, pos)`` tuples."""
    if positions is None:
        return None
    if isinstance(positions, tuple):
        raise TypeError(
            f"positions={positions!r} is ambiguous: pass a list, e.g. [{positions[0]!r}, ...] for "
            f"positions in every row, or [(batch_idx, pos)] for one cell."
        )
    if isinstance(positions, Tensor) and positions.ndim == 0:
        positions = [positions]
    if not isinstance(positions, (Tensor, Iterable)):
        return [parse_key(positions)]
    keys = [parse_key(p) for p in positions]
    if not keys:
        raise ValueError("positions is empty; pass None to mean every position")
    return keys


def _normalise(value: int, size: int, what: str, name: str) -> int:
    if not -size <= value < size:
        raise IndexError(
            f"{what} {value} is out of range for {name}: the activation has {size} "
            f"{'positions' if what == 'position' else 'batch rows'} (valid: {-size}..{size - 1})"
        )
    return value % size


def resolve(
    keys: Sequence[Key], batch: int, n_pos: int, name: str
) -> tuple[list[int], list[int], list[int]]:
    """Expand keys to cells: ``(rows, cols, owner)``, ``owner[i]`` = index of the key of cell i.

    Negative indices are normalised; out-of-range ones and a cell named twice raise."""
    rows, cols, owner, seen = [], [], [], {}
    for i, (b, p) in enumerate(keys):
        col = _normalise(p, n_pos, "position", name)
        for row in range(batch) if b is None else [_normalise(b, batch, "batch index", name)]:
            if (row, col) in seen:
                raise ValueError(
                    f"{name}: position {col} of batch row {row} is named twice (by keys "
                    f"{_show(keys[seen[row, col]])} and {_show(keys[i])}); name each cell once"
                )
            seen[row, col] = i
            rows.append(row)
            cols.append(col)
            owner.append(i)
    return rows, cols, owner


def all_cells(batch: int, n_pos: int) -> tuple[list[int], list[int]]:
    return [b for b in range(batch) for _ in range(n_pos)], list(range(n_pos)) * batch


def _show(key: Key) -> str:
    return repr(key[1]) if key[0] is None else repr(key)


def as_tensor(value, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}") from None


def fit_vector(
    vector: Tensor, activation: Tensor, name: str, what: str, *, per_row: bool = False
) -> Tensor:
    """Check ``vector`` is ``[*trailing]`` (or ``[batch, *trailing]`` when ``per_row``) and move
    it to the activation's dtype and device."""
    trailing = tuple(activation.shape[2:])
    shape = tuple(vector.shape)
    ok = shape == trailing or (per_row and shape == (activation.shape[0], *trailing))
    if not ok:
        wanted = f"{trailing}" + (
            f" (or {(activation.shape[0], *trailing)}, one per batch row)" if per_row else ""
        )
        raise ValueError(
            f"{what} has shape {shape}, but {name} activations are {tuple(activation.shape)} "
            f"[batch, pos, ...]: it must have shape {wanted}"
        )
    return vector.to(device=activation.device, dtype=activation.dtype)


def write_cells(activation: Tensor, rows: list[int], cols: list[int], values: Tensor) -> Tensor:
    """A copy of ``activation`` with ``[rows[i], cols[i]]`` set to ``values[i]``.

    Never writes into ``activation`` itself: other hooks (a ``record`` earlier on the same hook
    point, ``run_with_cache``) may hold a reference to it."""
    out = activation.clone()
    index = (
        torch.tensor(rows, dtype=torch.long, device=activation.device),
        torch.tensor(cols, dtype=torch.long, device=activation.device),
    )
    out[index] = values
    return out


def read_cells(activation: Tensor, rows: list[int], cols: list[int]) -> Tensor:
    """``activation[rows[i], cols[i]]`` stacked: ``[n_cells, *trailing]`` (a copy)."""
    index = (
        torch.tensor(rows, dtype=torch.long, device=activation.device),
        torch.tensor(cols, dtype=torch.long, device=activation.device),
    )
    return activation[index]
