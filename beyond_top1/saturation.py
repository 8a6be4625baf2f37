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

import copy
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


POSITION_BLOCK = 1 << 15  # positions per block of the permutation nulls (one seed each)


def _block_generator(seed: int, block: int) -> torch.Generator:
    """The generator of block ``block``: a function of ``(seed, block)`` only, so the nulls do
    not depend on how the positions were split into pieces, files or ranks."""
    state = np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def _null_sums(
    s: Int[Tensor, "n k"], n_layers: int, convention: str, n_permutations: int, generator, chunk
) -> tuple[Float[Tensor, " n_permutations"], Float[Tensor, " n_permutations"]]:
    """Per permutation: the sum of strict τ over the positions kept, and their count."""
    k_kept = kept_rank_counts(s, n_layers)
    if convention == "kept":
        s, k_kept = s[k_kept >= MIN_KEPT_RANKS], k_kept[k_kept >= MIN_KEPT_RANKS]
    n, k = s.shape
    columns = torch.arange(k)
    fixed = columns[None, :] >= k_kept[:, None] if convention == "kept" else columns[None, :] < 0
    sums, counts = [], []
    for start in range(0, n_permutations, chunk):
        p = min(chunk, n_permutations - start)
        keys = torch.rand(p, n, k, generator=generator)
        keys = torch.where(fixed, columns.to(keys.dtype) + 2.0, keys)  # shuffled ones first
        permuted = torch.gather(s.expand(p, n, k), 2, keys.argsort(-1))  # [p, n, k]
        kept = k_kept if convention == "kept" else kept_rank_counts(permuted, n_layers)
        tau = _tau_given_counts(permuted, kept)
        sums.append(tau.nan_to_num(0.0).sum(-1))
        counts.append((~tau.isnan()).sum(-1).to(torch.float64))
    return torch.cat(sums), torch.cat(counts)


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

    Positions are shuffled in blocks of :data:`POSITION_BLOCK`, each with its own generator
    seeded by ``(seed, block)``, so memory is bounded and :class:`OrderingAccumulator` gives the
    same nulls however the positions arrive.
    """
    if convention not in NULL_CONVENTIONS:
        raise ValueError(f"convention must be one of {NULL_CONVENTIONS}, got {convention!r}")
    s = _as_tensor(s).to(torch.int64)
    sums = torch.zeros(n_permutations, dtype=torch.float64)
    counts = torch.zeros(n_permutations, dtype=torch.float64)
    for block, start in enumerate(range(0, len(s), POSITION_BLOCK)):
        part = s[start : start + POSITION_BLOCK]
        generator = _block_generator(seed, block)
        block_sums, block_counts = _null_sums(
            part, n_layers, convention, n_permutations, generator, chunk
        )
        sums += block_sums
        counts += block_counts
    return sums / counts  # NaN where no position is kept


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


def _places(s: Tensor, k_kept: Tensor) -> tuple[Tensor, Tensor]:
    """Each kept ``s_j``'s average 1-based place among its position's kept values, and the
    validity mask ``j < k'``."""
    s = s.to(torch.float64)
    k = s.shape[1]
    valid = torch.arange(k)[None, :] < k_kept[:, None]
    masked = torch.where(valid, s, torch.full_like(s, math.inf))
    less = (masked[:, None, :] < masked[:, :, None]).sum(-1).double()
    equal = (masked[:, None, :] == masked[:, :, None]).sum(-1).double()
    return less + (equal + 1) / 2, valid


def _place_sums(s: Tensor, k_kept: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per rank: kept positions, the sum of their places, and how many sit in place."""
    place, valid = _places(s, k_kept)
    ranks = torch.arange(1, s.shape[1] + 1, dtype=torch.float64)
    return valid.sum(0), torch.where(valid, place, 0.0).sum(0), (valid & (place == ranks)).sum(0)


def _correspondence_frame(n, place_sum, in_place) -> pd.DataFrame:
    rows = []
    for j, (count, total, hits) in enumerate(zip(n, place_sum, in_place, strict=True)):
        count = int(count)
        rows.append(
            {
                "rank": j + 1,
                "n": count,
                "mean_place": float(total) / count if count else math.nan,
                "frac_in_place": float(hits) / count if count else math.nan,
            }
        )
    return pd.DataFrame(rows)


def rank_correspondence(s: Int[Tensor, "n k"], k_kept: Int[Tensor, " n"]) -> pd.DataFrame:
    """Where ``s_j`` falls within each position's sorted saturation layers, per rank ``j``.

    For each kept position the kept ``s`` values are ranked (1 = earliest; ties get their average
    place). Returns one row per rank: ``rank, n, mean_place, frac_in_place`` (the fraction whose
    place equals its rank). Perfect order gives ``mean_place = rank``.
    """
    return _correspondence_frame(*_place_sums(_as_tensor(s), _as_tensor(k_kept)))


def _distribution_frame(counts: Tensor, n_layers: int) -> pd.DataFrame:
    rows = []
    for j in range(counts.shape[0]):
        total = max(int(counts[j].sum()), 1)
        for layer, count in enumerate(counts[j].tolist()):
            rows.append((j + 1, layer, int(count), count / total))
    return pd.DataFrame(rows, columns=["rank", "layer", "count", "fraction"])


def _layer_counts(s: Tensor, n_layers: int) -> Tensor:
    """``[k, L]`` counts of each ``s_i`` value."""
    return torch.stack(
        [
            torch.bincount(s[:, j].clamp(0, n_layers), minlength=n_layers + 1)[:n_layers]
            for j in range(s.shape[1])
        ]
    )


def saturation_distribution(s: Int[Tensor, "n k"], n_layers: int) -> pd.DataFrame:
    """Counts of each ``s_i`` value per rank: columns ``rank, layer, count, fraction``."""
    return _distribution_frame(_layer_counts(_as_tensor(s).to(torch.int64), n_layers), n_layers)


class OrderingAccumulator:
    """001's ordering statistics of saturation layers that arrive in pieces (scan shards, row
    groups of a parquet file, ranks), in memory bounded by :data:`POSITION_BLOCK`.

    ``update(s)`` with ``[m, k]`` blocks in position order, then ``result()``. The result is
    the same however the positions were split (the nulls shuffle fixed blocks of the filtered
    positions, each with its own seeded generator), and equals :func:`ordering` of all of them.
    """

    def __init__(
        self,
        k: int,
        n_layers: int,
        *,
        filter_fraction: float = DEFAULT_FILTER_FRACTION,
        n_permutations: int = DEFAULT_PERMUTATIONS,
        seed: int = 0,
    ):
        if k < MIN_KEPT_RANKS:
            raise ValueError(f"ordering statistics need k >= {MIN_KEPT_RANKS}, got {k}")
        if not 0 <= filter_fraction <= 1:
            raise ValueError(f"filter_fraction must be in [0, 1], got {filter_fraction}")
        if n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
        self.k, self.n_layers = k, n_layers
        self.filter_fraction, self.n_permutations, self.seed = filter_fraction, n_permutations, seed
        self.n_positions = self.n_passing = self.n_kept = self.n_ordered = 0
        self.tau_sum = self.tau_square_sum = 0.0
        self.layer_counts = torch.zeros(k, n_layers, dtype=torch.int64)
        self.place_n = torch.zeros(k, dtype=torch.int64)
        self.place_sum = torch.zeros(k, dtype=torch.float64)
        self.in_place = torch.zeros(k, dtype=torch.int64)
        self.null_sums = {
            c: torch.zeros(n_permutations, dtype=torch.float64) for c in NULL_CONVENTIONS
        }
        self.null_counts = {
            c: torch.zeros(n_permutations, dtype=torch.float64) for c in NULL_CONVENTIONS
        }
        self._pending: list[Tensor] = []
        self._n_pending = 0
        self._block = 0

    def update(self, s: Int[Tensor, "m k"]) -> OrderingAccumulator:
        s = _as_tensor(s).to(torch.int64)
        if s.ndim != 2 or s.shape[1] != self.k:
            raise ValueError(f"s must have shape [n, {self.k}], got {tuple(s.shape)}")
        if len(s) and (int(s.min()) < 0 or int(s.max()) > self.n_layers - 1):
            raise ValueError(f"saturation layers must lie in [0, {self.n_layers - 1}]")
        self.n_positions += len(s)
        filtered = s[position_filter(s[:, 0], self.n_layers, self.filter_fraction)]
        self.n_passing += len(filtered)
        self.layer_counts += _layer_counts(filtered, self.n_layers)
        self._pending.append(filtered)
        self._n_pending += len(filtered)
        if self._n_pending >= POSITION_BLOCK:  # whole blocks now, the rest kept for later
            pending = torch.cat(self._pending)
            whole = len(pending) - len(pending) % POSITION_BLOCK
            for start in range(0, whole, POSITION_BLOCK):
                self._add_block(pending[start : start + POSITION_BLOCK], self._block)
                self._block += 1
            self._pending, self._n_pending = [pending[whole:]], len(pending) - whole
        return self

    def _add_block(self, block: Tensor, index: int) -> None:
        """Add one block of filtered positions (the ``index``-th: it seeds the shuffles)."""
        if not len(block):
            return
        k_kept = kept_rank_counts(block, self.n_layers)
        kept = k_kept >= MIN_KEPT_RANKS
        s_kept, k_kept = block[kept], k_kept[kept]
        tau = _tau_given_counts(s_kept, k_kept)
        self.n_kept += len(s_kept)
        self.tau_sum += float(tau.sum())
        self.tau_square_sum += float(tau.pow(2).sum())
        self.n_ordered += int((tau == 1.0).sum())
        n, place_sum, in_place = _place_sums(s_kept, k_kept)
        self.place_n += n
        self.place_sum += place_sum
        self.in_place += in_place
        for convention in NULL_CONVENTIONS:
            generator = _block_generator(self.seed, index)  # the same draws as permutation_null
            sums, counts = _null_sums(
                block, self.n_layers, convention, self.n_permutations, generator, 50
            )
            self.null_sums[convention] += sums
            self.null_counts[convention] += counts

    def result(self) -> OrderingStats:
        """The statistics of every position given so far (more may be added after)."""
        if self._n_pending:  # the last, partial block, added to a copy
            final = copy.deepcopy(self)
            final._n_pending, final._pending = 0, []
            final._add_block(torch.cat(self._pending), self._block)
            return final.result()
        n = self.n_kept
        nulls = {}
        if n:
            mean_tau = self.tau_sum / n
            variance = (self.tau_square_sum - n * mean_tau**2) / (n - 1) if n > 1 else math.nan
            tau_se = math.sqrt(max(variance, 0.0) / n) if n > 1 else math.nan
            frac_ordered = self.n_ordered / n
            for convention in NULL_CONVENTIONS:
                null = self.null_sums[convention] / self.null_counts[convention]
                nulls[f"null_{convention}_mean"] = float(null.mean())
                nulls[f"null_{convention}_std"] = float(null.std())
                nulls[f"p_value_{convention}"] = float((null >= mean_tau - 1e-12).double().mean())
        else:
            mean_tau = tau_se = frac_ordered = math.nan
            for convention in NULL_CONVENTIONS:
                for key in ("null_{}_mean", "null_{}_std", "p_value_{}"):
                    nulls[key.format(convention)] = math.nan
        return OrderingStats(
            k=self.k,
            n_layers=int(self.n_layers),
            n_positions=self.n_positions,
            n_passing_filter=self.n_passing,
            n_kept=n,
            mean_tau=mean_tau,
            tau_se=tau_se,
            **nulls,
            frac_strictly_increasing=frac_ordered,
            n_permutations=self.n_permutations,
            filter_fraction=self.filter_fraction,
            seed=self.seed,
            rank_correspondence=_correspondence_frame(self.place_n, self.place_sum, self.in_place),
            distribution=_distribution_frame(self.layer_counts, self.n_layers),
        )


def s_columns(frame_columns) -> list[str]:
    """The ``s_1..s_k`` column names of a saturation table, in rank order."""
    columns = sorted(
        (c for c in frame_columns if c.startswith("s_") and c[2:].isdigit()),
        key=lambda c: int(c[2:]),
    )
    if not columns:
        raise ValueError("the table has no s_1..s_k columns")
    return columns


def ordering(
    s: Int[Tensor, "n k"] | pd.DataFrame,
    n_layers: int | None = None,
    *,
    filter_fraction: float = DEFAULT_FILTER_FRACTION,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> OrderingStats:
    """Do ranks saturate in order? 001's statistics for saturation layers ``s``.

    See docs/definitions.md, "Ordering statistics". For more positions than fit in memory, feed
    an :class:`OrderingAccumulator` piece by piece (``beyond_top1.scans.scan_ordering`` does
    that from a scan folder's row groups).

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
        s = torch.as_tensor(s[s_columns(s.columns)].to_numpy())
    s = _as_tensor(s).to(torch.int64)
    if n_layers is None:
        raise ValueError("pass n_layers (the model's number of layers)")
    if s.ndim != 2 or s.shape[1] < MIN_KEPT_RANKS:
        raise ValueError(
            f"s must have shape [n, k] with k >= {MIN_KEPT_RANKS} for ordering statistics, "
            f"got {tuple(s.shape)}"
        )
    accumulator = OrderingAccumulator(
        s.shape[1],
        n_layers,
        filter_fraction=filter_fraction,
        n_permutations=n_permutations,
        seed=seed,
    )
    return accumulator.update(s).result()


__all__ = [
    "NULL_CONVENTIONS",
    "OrderingAccumulator",
    "POSITION_BLOCK",
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
    "s_columns",
]
