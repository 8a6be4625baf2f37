"""Saturation events and ordering statistics (docs/definitions.md; papers 000/001).

Everything here is a pure function of small integer arrays, so it is exact and cheap:

* :func:`saturation_layers`: ``s_i``, the first layer of the final unbroken run in which rank ``i``
  holds its final token, from the top-k token ids of every layer;
* :func:`position_filter`: 001's filter, ``s_1 <= floor(0.85 L)``;
* :func:`kendall_tau_strict`: 001's strict Kendall τ per position (ties are discordant, trailing
  ranks that saturate only at the last layer are dropped, at least 3 ranks are needed);
* :func:`ordering`: mean τ with two within-position permutation nulls (shuffle the kept ranks,
  or shuffle all ``k`` and re-apply the drop rule), the fraction of strictly ordered positions,
  the rank-correspondence table and the distribution of each ``s_i``.

Layers are 0-based (``0..L-1``), ranks 1-based. Arrays may be torch tensors or numpy arrays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from beyond_top1.fileio import to_jsonable

DEFAULT_FILTER_FRACTION = 0.85
DEFAULT_PERMUTATIONS = 1000
MIN_KEPT_RANKS = 3


def _as_tensor(values) -> Tensor:
    return values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))


def saturation_layers(
    top_ids: Int[Tensor, "*batch layer k"],
    final_ids: Int[Tensor, "*batch k"] | None = None,
) -> Int[Tensor, "*batch k"]:
    """``s_i = min{l : r_i(l') = t_i for all l' in [l, L-1]}`` for every rank ``i``.

    Args:
        top_ids: the token at rank ``i`` (column ``i-1``) under the lens at every layer
            ``0..L-1`` (row ``l``).
        final_ids: the final top-k ``t_1..t_k`` (default: the last row of ``top_ids``).

    Returns:
        0-based layers (``int64``). A token that holds its rank at every layer gets 0, one that
        settles only at the last layer gets ``L-1``. If ``final_ids`` is given and differs from
        the last layer's ranking, the rank never saturates and gets ``L``.
    """
    top_ids = _as_tensor(top_ids)
    if top_ids.ndim < 2:
        raise ValueError(f"top_ids must have shape [..., layer, k], got {tuple(top_ids.shape)}")
    final = top_ids[..., -1, :] if final_ids is None else _as_tensor(final_ids)
    if final.shape != top_ids.shape[:-2] + top_ids.shape[-1:]:
        raise ValueError(
            f"final_ids must have shape {tuple(top_ids.shape[:-2] + top_ids.shape[-1:])}, "
            f"got {tuple(final.shape)}"
        )
    n_layers = top_ids.shape[-2]
    holds = top_ids == final.unsqueeze(-2).to(top_ids.device)
    trailing_run = holds.flip(-2).to(torch.int64).cumprod(-2).sum(-2)
    return n_layers - trailing_run


def position_filter(
    s1: Int[Tensor, " n"], n_layers: int, fraction: float = DEFAULT_FILTER_FRACTION
) -> Bool[Tensor, " n"]:
    """Positions whose top-1 saturates early enough to leave room for later tasks (001).

    ``s_1 <= floor(fraction · L)``.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return _as_tensor(s1) <= math.floor(fraction * n_layers)


def kept_rank_counts(s: Int[Tensor, "n k"], n_layers: int) -> Int[Tensor, " n"]:
    """``k'`` per position: ``k`` minus the trailing ranks that saturate only at ``L-1``."""
    s = _as_tensor(s)
    at_last = (s >= n_layers - 1).to(torch.int64)
    trailing = at_last.flip(-1).cumprod(-1).sum(-1)
    return s.shape[-1] - trailing


def _pair_masks(k: int, device=None) -> tuple[Tensor, Tensor]:
    """Index arrays ``(i, j)`` of all rank pairs ``i < j``."""
    i, j = torch.triu_indices(k, k, offset=1, device=device)
    return i, j


def _tau_given_counts(
    s: Int[Tensor, "*batch n k"], k_kept: Int[Tensor, "*batch n"]
) -> Float[Tensor, "*batch n"]:
    """Strict τ against the order 1..k' for rows with ``k'`` ranks kept (NaN if ``k' < 3``)."""
    k = s.shape[-1]
    i, j = _pair_masks(k, s.device)
    valid = j < k_kept[..., None]  # [..., n, pairs]; i < j < k' implies i < k'
    concordant = s[..., i] < s[..., j]
    score = torch.where(concordant, 1.0, -1.0) * valid  # ties and inversions are discordant
    n_pairs = (k_kept * (k_kept - 1) / 2).to(torch.float64)
    tau = score.to(torch.float64).sum(-1) / n_pairs.clamp_min(1)
    return torch.where(k_kept >= MIN_KEPT_RANKS, tau, torch.full_like(tau, math.nan))


def kendall_tau_strict(s: Int[Tensor, "n k"], n_layers: int) -> Float[Tensor, " n"]:
    """001's strict Kendall τ of each position's ``(s_1..s_k)`` against the order ``1..k'``.

    Trailing ranks with ``s_i = L-1`` are dropped; positions with fewer than 3 ranks left get NaN.
    ``τ = (concordant - discordant) / C(k', 2)`` where a tie counts as discordant, so τ = 1
    exactly when ``s_1 < s_2 < ... < s_k'``.
    """
    s = _as_tensor(s).to(torch.int64)
    if s.ndim != 2:
        raise ValueError(f"s must have shape [n, k], got {tuple(s.shape)}")
    return _tau_given_counts(s, kept_rank_counts(s, n_layers))


NULL_CONVENTIONS = ("kept", "all")

# Every ordering table (CLI, report, experiments) shows these fields, with these labels.
ORDERING_LABELS = {
    "n_positions": "positions",
    "n_passing_filter": "pass the s_1 filter",
    "n_kept": "kept (k' >= 3)",
    "mean_tau": "mean strict tau",
    "tau_se": "  SE",
    "null_kept_mean": "null (a) shuffle kept ranks: mean",
    "null_kept_std": "  null (a) SD",
    "p_value_kept": "  p, null (a)",
    "null_all_mean": "null (b) shuffle all k, re-drop: mean",
    "null_all_std": "  null (b) SD",
    "p_value_all": "  p, null (b)",
    "frac_strictly_increasing": "strictly ordered",
}


def permutation_null(
    s: Int[Tensor, "n k"],
    n_layers: int,
    *,
    convention: str = "kept",
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    chunk: int = 50,
) -> Float[Tensor, " n_permutations"]:
    """Mean strict τ after shuffling each position's saturation layers, per permutation.

    ``s`` holds the positions that pass the filter. Two conventions (docs/definitions.md):

    * ``"kept"``: (a) each position's ``k'`` kept values are permuted; ``k'`` stays fixed and
      positions with ``k' < 3`` are left out, as in the observed statistic.
    * ``"all"``: (b) all ``k`` values are permuted, then the drop rule is applied again to the
      permuted vector (trailing ``L-1`` dropped, ``k' >= 3`` kept); the mean is over the
      positions kept in that permutation. A value ``L-1`` moved before the end now counts in
      pairs, so this null is far lower than (a).
    """
    if convention not in NULL_CONVENTIONS:
        raise ValueError(f"convention must be one of {NULL_CONVENTIONS}, got {convention!r}")
    s = _as_tensor(s).to(torch.int64)
    k_kept = kept_rank_counts(s, n_layers)
    if convention == "kept":
        s, k_kept = s[k_kept >= MIN_KEPT_RANKS], k_kept[k_kept >= MIN_KEPT_RANKS]
    n, k = s.shape
    generator = torch.Generator().manual_seed(seed)
    columns = torch.arange(k)
    fixed = columns[None, :] >= k_kept[:, None] if convention == "kept" else columns[None, :] < 0
    means = []
    for start in range(0, n_permutations, chunk):
        p = min(chunk, n_permutations - start)
        keys = torch.rand(p, n, k, generator=generator)
        keys = torch.where(fixed, columns.to(keys.dtype) + 2.0, keys)  # shuffled ones first
        permuted = torch.gather(s.expand(p, n, k), 2, keys.argsort(-1))  # [p, n, k]
        counts = k_kept if convention == "kept" else kept_rank_counts(permuted, n_layers)
        means.append(_tau_given_counts(permuted, counts).nanmean(-1))
    return torch.cat(means)


@dataclass
class OrderingStats:
    """Ordering statistics of one set of saturation layers (001 §2.2; docs/definitions.md).

    Counts: ``n_positions`` scored, ``n_passing_filter`` with ``s_1 <= floor(filter · L)``,
    ``n_kept`` of those with at least 3 ranks left after the drop rule. Two permutation nulls,
    each with its ``p`` (the fraction of permutation means ``>=`` the observed mean; 0 means
    below ``1 / n_permutations``): ``*_kept`` shuffles the kept ranks with ``k'`` fixed (a);
    ``*_all`` shuffles all ``k`` and re-applies the drop rule (b).
    """

    k: int
    n_layers: int
    n_positions: int
    n_passing_filter: int
    n_kept: int
    mean_tau: float
    tau_se: float
    null_kept_mean: float
    null_kept_std: float
    p_value_kept: float
    null_all_mean: float
    null_all_std: float
    p_value_all: float
    frac_strictly_increasing: float
    n_permutations: int
    filter_fraction: float
    seed: int
    rank_correspondence: pd.DataFrame = field(repr=False)
    distribution: pd.DataFrame = field(repr=False)

    def summary(self) -> dict:
        """The scalar statistics as a JSON-ready dict."""
        out = asdict(self)
        out.pop("rank_correspondence")
        out.pop("distribution")
        return {key: to_jsonable(value) for key, value in out.items()}

    def to_frame(self) -> pd.DataFrame:
        """One-column table of the scalar statistics."""
        return pd.Series(self.summary(), name="value").to_frame()

    def _repr_html_(self) -> str:
        table = self.to_frame().to_html()
        corr = self.rank_correspondence.to_html(index=False, float_format="{:.3f}".format)
        return f"<div><b>Ordering statistics</b>{table}<b>Rank correspondence</b>{corr}</div>"


def rank_correspondence(s: Int[Tensor, "n k"], k_kept: Int[Tensor, " n"]) -> pd.DataFrame:
    """Where ``s_j`` falls within each position's sorted saturation layers, per rank ``j``.

    For each kept position the kept ``s`` values are ranked (1 = earliest; ties get their average
    place). Returns one row per rank: ``rank, n, mean_place, frac_in_place`` (the fraction whose
    place equals its rank). Perfect order gives ``mean_place = rank``.
    """
    s = _as_tensor(s).to(torch.float64)
    n, k = s.shape
    valid = torch.arange(k)[None, :] < k_kept[:, None]
    masked = torch.where(valid, s, torch.full_like(s, math.inf))
    less = (masked[:, None, :] < masked[:, :, None]).sum(-1).double()
    equal = (masked[:, None, :] == masked[:, :, None]).sum(-1).double()
    place = less + (equal + 1) / 2  # average 1-based place among kept ranks
    rows = []
    for j in range(k):
        rows_j = valid[:, j]
        count = int(rows_j.sum())
        places = place[rows_j, j]
        rows.append(
            {
                "rank": j + 1,
                "n": count,
                "mean_place": float(places.mean()) if count else math.nan,
                "frac_in_place": float((places == j + 1).double().mean()) if count else math.nan,
            }
        )
    return pd.DataFrame(rows)


def saturation_distribution(s: Int[Tensor, "n k"], n_layers: int) -> pd.DataFrame:
    """Counts of each ``s_i`` value per rank: columns ``rank, layer, count, fraction``."""
    s = _as_tensor(s).to(torch.int64)
    rows = []
    for j in range(s.shape[1]):
        counts = torch.bincount(s[:, j].clamp(0, n_layers), minlength=n_layers + 1)[:n_layers]
        total = max(int(counts.sum()), 1)
        for layer, count in enumerate(counts.tolist()):
            rows.append((j + 1, layer, count, count / total))
    return pd.DataFrame(rows, columns=["rank", "layer", "count", "fraction"])


def ordering(
    s: Int[Tensor, "n k"] | pd.DataFrame,
    n_layers: int | None = None,
    *,
    filter_fraction: float = DEFAULT_FILTER_FRACTION,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> OrderingStats:
    """Do ranks saturate in order? 001's statistics for saturation layers ``s``.

    See docs/definitions.md, "Ordering statistics".

    Args:
        s: ``[n, k]`` saturation layers, or a scan result / saturation DataFrame with columns
            ``s_1..s_k`` (then ``n_layers`` defaults to its ``n_layers`` attribute).
        n_layers: ``L``.
        filter_fraction: keep positions with ``s_1 <= floor(filter_fraction · L)``.
        n_permutations, seed: both within-position permutation nulls
            (:func:`permutation_null`).
    """
    if hasattr(s, "saturation") and hasattr(s, "n_layers"):  # a ScanResult
        n_layers = n_layers or s.n_layers
        s = s.saturation
    if isinstance(s, pd.DataFrame):
        n_layers = n_layers or s.attrs.get("n_layers")
        columns = sorted(
            (c for c in s.columns if c.startswith("s_") and c[2:].isdigit()),
            key=lambda c: int(c[2:]),
        )
        if not columns:
            raise ValueError("the DataFrame has no s_1..s_k columns")
        s = torch.as_tensor(s[columns].to_numpy())
    s = _as_tensor(s).to(torch.int64)
    if n_layers is None:
        raise ValueError("pass n_layers (the model's number of layers)")
    if s.ndim != 2 or s.shape[1] < MIN_KEPT_RANKS:
        raise ValueError(
            f"s must have shape [n, k] with k >= {MIN_KEPT_RANKS} for ordering statistics, "
            f"got {tuple(s.shape)}"
        )
    if len(s) and (int(s.min()) < 0 or int(s.max()) > n_layers - 1):
        raise ValueError(f"saturation layers must lie in [0, {n_layers - 1}]")
    filtered = s[position_filter(s[:, 0], n_layers, filter_fraction)]
    k_kept = kept_rank_counts(filtered, n_layers)
    kept = k_kept >= MIN_KEPT_RANKS
    s_kept, k_kept = filtered[kept], k_kept[kept]
    n_kept = len(s_kept)
    nulls = {}
    if n_kept:
        tau = _tau_given_counts(s_kept, k_kept)
        mean_tau = float(tau.mean())
        tau_se = float(tau.std() / math.sqrt(n_kept)) if n_kept > 1 else math.nan
        frac_ordered = float((tau == 1.0).double().mean())
        for convention in NULL_CONVENTIONS:
            null = permutation_null(
                filtered, n_layers, convention=convention, n_permutations=n_permutations, seed=seed
            )
            nulls[f"null_{convention}_mean"] = float(null.mean())
            nulls[f"null_{convention}_std"] = float(null.std())
            nulls[f"p_value_{convention}"] = float((null >= mean_tau - 1e-12).double().mean())
    else:
        mean_tau = tau_se = frac_ordered = math.nan
        for convention in NULL_CONVENTIONS:
            for key in (
                f"null_{convention}_mean",
                f"null_{convention}_std",
                f"p_value_{convention}",
            ):
                nulls[key] = math.nan
    return OrderingStats(
        k=int(s.shape[1]),
        n_layers=int(n_layers),
        n_positions=int(len(s)),
        n_passing_filter=int(len(filtered)),
        n_kept=n_kept,
        mean_tau=mean_tau,
        tau_se=tau_se,
        **nulls,
        frac_strictly_increasing=frac_ordered,
        n_permutations=n_permutations,
        filter_fraction=filter_fraction,
        seed=seed,
        rank_correspondence=rank_correspondence(s_kept, k_kept),
        distribution=saturation_distribution(filtered, n_layers),
    )


__all__ = [
    "NULL_CONVENTIONS",
    "ORDERING_LABELS",
    "OrderingStats",
    "kendall_tau_strict",
    "kept_rank_counts",
    "ordering",
    "permutation_null",
    "position_filter",
    "rank_correspondence",
    "saturation_distribution",
    "saturation_layers",
]
