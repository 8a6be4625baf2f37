"""Statistics of saturation layers and task labels, as one namespace (``bt.stats``).

Plain functions of small integer arrays (see docs/definitions.md): the saturation layers, the
position filter, the strict Kendall τ and its two permutation nulls, the rank correspondence,
and the task labels the probes learn.
"""

from beyond_top1.probes import task_labels
from beyond_top1.saturation import (
    NULL_CONVENTIONS,
    ORDERING_LABELS,
    OrderingAccumulator,
    OrderingStats,
    kendall_tau_strict,
    kept_rank_counts,
    ordering,
    permutation_null,
    position_filter,
    rank_correspondence,
    saturation_distribution,
    saturation_layers,
)

__all__ = [
    "NULL_CONVENTIONS",
    "ORDERING_LABELS",
    "OrderingAccumulator",
    "OrderingStats",
    "kendall_tau_strict",
    "kept_rank_counts",
    "ordering",
    "permutation_null",
    "position_filter",
    "rank_correspondence",
    "saturation_distribution",
    "saturation_layers",
    "task_labels",
]
