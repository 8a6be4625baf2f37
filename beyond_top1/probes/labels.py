"""Task labels: which rank a position is determining at each layer (001; see
docs/definitions.md, "Task index and probes")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Int
from torch import Tensor

EXCLUDED = 0
"""Label of an excluded (position, layer): out of order, or after ``s_k``. Tasks are 1..k."""


def task_labels(
    s: Int[np.ndarray, "n k"] | Int[Tensor, "n k"],
    layers: Sequence[int],
    n_layers: int,
) -> Int[np.ndarray, "n n_layers_given"]:
    """The task index of every position at every layer in ``layers`` (docs/definitions.md).

    Rank ``j`` counts as *saturated at layer l* when ``s_j < l`` (it has been fixed since an
    earlier layer). At layer ``l`` a position is doing task ``i`` when exactly ranks ``1..i-1``
    are saturated: ``s_{i-1} < l <= s_i`` with ``s_0 = -1`` *and* no later rank ``j > i`` has
    saturated yet. Otherwise the label is :data:`EXCLUDED` (0):

    * out of order: some rank ``j`` is saturated while an earlier rank is not (e.g.
      ``s = (8, 3, ...)`` at layers 4..8). This is stricter than "the formula gives two
      labels": ``s = (2, 8, 5)`` at layer 6 also counts as ambiguous, since rank 3 is done
      before rank 2;
    * after ``s_k``: all ``k`` tracked ranks are saturated (``l > s_k``); the position would be
      doing task ``k+1`` or more, which ``k`` ranks cannot tell, so it is left out.

    Args:
        s: ``[n, k]`` saturation layers in ``0..L-1``.
        layers: the layers to label (``0..L-1``).
        n_layers: ``L``.

    Returns:
        ``[n, len(layers)]`` int64 labels in ``1..k``, or 0 where excluded.
    """
    s = np.asarray(s.cpu() if isinstance(s, Tensor) else s).astype(np.int64)
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"s must have shape [n, k] with k >= 1, got {s.shape}")
    if s.size and (s.min() < 0 or s.max() > n_layers - 1):
        raise ValueError(f"saturation layers must lie in [0, {n_layers - 1}]")
    layer_arr = np.asarray(list(layers), dtype=np.int64)
    if layer_arr.size and (layer_arr.min() < 0 or layer_arr.max() > n_layers - 1):
        raise ValueError(f"layers must lie in [0, {n_layers - 1}], got {list(layers)}")
    k = s.shape[1]
    saturated = s[:, None, :] < layer_arr[None, :, None]  # [n, layers, k]
    count = saturated.sum(-1)
    prefix = np.cumprod(saturated, axis=-1).sum(-1)  # leading saturated ranks
    ok = (prefix == count) & (count < k)
    return np.where(ok, count + 1, EXCLUDED).astype(np.int64)


__all__ = ["EXCLUDED", "task_labels"]
