"""Source/target pairs for the task-shift intervention, and the default Δ and offsets."""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
import pandas as pd

DEFAULT_MAX_DISTANCE = 30
DEFAULT_MAX_PAIRS = 200
DIRECTIONS = ("forward", "backward")


def default_delta(n_layers: int) -> int:
    """Δ, the minimum gap between the pair's top-1 saturation layers.

    10 layers for models with ``L >= 24`` (001); otherwise scaled with depth,
    ``round_half_up(10 · L / 24)`` and at least 1: 5 for 12 layers, 3 for 6, 1 for 2.
    """
    if n_layers >= 24:
        return 10
    return max(1, math.floor(10 * n_layers / 24 + 0.5))


def default_offset_range(n_layers: int) -> int:
    """``a`` for offsets ``d ∈ [-a, a]``: half of :func:`default_delta` (5 for ``L >= 24``), so
    every patched layer ``s_src + d`` lies before the target's own ``s_1``."""
    return max(1, default_delta(n_layers) // 2)


def find_pairs(
    scan,
    *,
    n_layers: int | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    delta: int | None = None,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    one_per_target: bool = True,
    direction: str = "forward",
    text_ids: Collection[int] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Source/target pairs for the task-shift intervention.

    A pair is two positions of one text, at most ``max_distance`` tokens apart, with the same
    final top-1 token and top-1 saturation layers ``s_src + delta <= s_tgt``. The
    earlier-saturating position is the source.

    Args:
        scan: a :class:`~beyond_top1.scans.ScanResult`, or a DataFrame with columns
            ``text_id, pos, top_1_id, s_1`` (then pass ``n_layers`` for the default Δ).
        delta: default :func:`default_delta` of the model's depth.
        max_pairs: keep at most this many, chosen at random (seeded); ``None`` keeps all.
        one_per_target: use each target position in at most one pair (the first after a
            seeded shuffle), so that no target is counted twice.
        direction: ``"forward"`` (default): the source comes strictly before the target, so the
            patch carries only context the target can see; ``"backward"``: strictly after
            (report those separately).
        text_ids: only pairs from these texts (e.g. those a probe was not fitted on).

    Returns:
        One row per pair, sorted by text and target: ``pair_id, text_id, src_pos, tgt_pos,
        src_row, tgt_row`` (rows of the scan), ``top1_id, s_src, s_tgt, gap, distance,
        direction``.
    """
    if hasattr(scan, "saturation"):
        frame, n_layers = scan.saturation, n_layers or scan.n_layers
    else:
        frame = scan
    missing = {"text_id", "pos", "top_1_id", "s_1"} - set(frame.columns)
    if missing:
        raise ValueError(f"the frame lacks columns {sorted(missing)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if delta is None:
        if n_layers is None:
            raise ValueError("pass delta, or n_layers for the default")
        delta = default_delta(n_layers)
    if delta < 1 or max_distance < 1:
        raise ValueError(f"delta and max_distance must be >= 1, got {delta}, {max_distance}")
    base = pd.DataFrame(
        {
            "row": np.arange(len(frame)),
            "text_id": frame["text_id"].to_numpy(),
            "pos": frame["pos"].to_numpy(),
            "top1_id": frame["top_1_id"].to_numpy(),
            "s": frame["s_1"].to_numpy(),
        }
    )
    merged = base.merge(base, on=["text_id", "top1_id"], suffixes=("_src", "_tgt"))
    ahead = merged["pos_tgt"] - merged["pos_src"]  # > 0: the source comes first
    if direction == "backward":
        ahead = -ahead
    gap = merged["s_tgt"] - merged["s_src"]
    keep = (ahead > 0) & (ahead <= max_distance) & (gap >= delta)
    if text_ids is not None:
        keep &= merged["text_id"].isin(list(text_ids))
    merged = merged[keep]
    pairs = pd.DataFrame(
        {
            "text_id": merged["text_id"].to_numpy(),
            "src_pos": merged["pos_src"].to_numpy(),
            "tgt_pos": merged["pos_tgt"].to_numpy(),
            "src_row": merged["row_src"].to_numpy(),
            "tgt_row": merged["row_tgt"].to_numpy(),
            "top1_id": merged["top1_id"].to_numpy(),
            "s_src": merged["s_src"].to_numpy(),
            "s_tgt": merged["s_tgt"].to_numpy(),
        }
    )
    pairs = pairs.sort_values(["text_id", "tgt_pos", "src_pos"]).reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = pairs.iloc[order]
    if one_per_target:
        pairs = pairs.drop_duplicates("tgt_row", keep="first")
    if max_pairs is not None:
        pairs = pairs.head(max_pairs)
    pairs = pairs.sort_values(["text_id", "tgt_pos", "src_pos"]).reset_index(drop=True)
    pairs["gap"] = pairs["s_tgt"] - pairs["s_src"]
    pairs["distance"] = (pairs["tgt_pos"] - pairs["src_pos"]).abs()
    pairs["direction"] = direction
    pairs.insert(0, "pair_id", np.arange(len(pairs)))
    pairs.attrs.update({"delta": int(delta), "max_distance": int(max_distance), "seed": seed})
    pairs.attrs["direction"] = direction
    return pairs


__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "DEFAULT_MAX_PAIRS",
    "DIRECTIONS",
    "default_delta",
    "default_offset_range",
    "find_pairs",
]
