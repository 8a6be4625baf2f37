"""Saturation layers and ordering statistics against brute-force loops (docs/definitions.md)."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from beyond_top1.saturation import (
    kendall_tau_strict,
    kept_rank_counts,
    ordering,
    permutation_null,
    position_filter,
    rank_correspondence,
    saturation_layers,
)


def brute_saturation(top_ids: np.ndarray) -> list[int]:
    """s_i = min{l : r_i(l') = t_i for all l' >= l}, by the definition's own loops."""
    n_layers, k = top_ids.shape
    out = []
    for i in range(k):
        final = top_ids[-1, i]
        s = n_layers - 1
        for l in range(n_layers):
            if all(top_ids[m, i] == final for m in range(l, n_layers)):
                s = l
                break
        out.append(s)
    return out


def brute_tau(s: list[int], n_layers: int) -> float:
    kept = list(s)
    while kept and kept[-1] == n_layers - 1:
        kept.pop()
    if len(kept) < 3:
        return math.nan
    return strict_tau(kept)


def strict_tau(values) -> float:
    """τ against the order 1..n, ties discordant, no drop rule."""
    score = 0
    for i, j in combinations(range(len(values)), 2):
        score += 1 if values[i] < values[j] else -1  # ties are discordant
    return score / math.comb(len(values), 2)


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.int64, st.tuples(st.integers(1, 12), st.integers(1, 5)), elements=st.integers(0, 3))
)
def test_saturation_matches_brute_force(top_ids):
    expected = brute_saturation(top_ids)
    got = saturation_layers(torch.as_tensor(top_ids)).tolist()
    assert got == expected


def test_saturation_batched_and_edge_cases():
    L = 6
    constant = torch.tensor([[7, 8, 9]] * L)  # never changes -> s = 0
    late = torch.tensor([[1, 2, 3]] * (L - 1) + [[7, 8, 9]])  # settles only at L-1
    flicker = torch.tensor([[7, 2, 9], [1, 8, 9], [7, 8, 2], [7, 8, 9], [7, 1, 9], [7, 8, 9]])
    s = saturation_layers(torch.stack([constant, late, flicker]))
    assert s.tolist() == [[0, 0, 0], [L - 1, L - 1, L - 1], [2, 5, 3]]
    # numpy input and an explicit final ranking that differs from the last layer: never saturated
    assert saturation_layers(constant.numpy(), torch.tensor([7, 8, 1])).tolist() == [0, 0, L]
    with pytest.raises(ValueError, match="final_ids must have shape"):
        saturation_layers(constant, torch.tensor([1, 2]))


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.int64, st.tuples(st.integers(1, 20), st.integers(1, 6)), elements=st.integers(0, 9))
)
def test_strict_tau_matches_brute_force(s):
    got = kendall_tau_strict(torch.as_tensor(s), n_layers=10).tolist()
    expected = [brute_tau(list(row), 10) for row in s]
    np.testing.assert_allclose(got, expected, equal_nan=True)


def test_tau_ties_are_discordant_and_trailing_last_layer_ranks_dropped():
    L = 10
    s = torch.tensor(
        [
            [1, 2, 3, 4],  # ordered: 1
            [1, 1, 1, 1],  # all ties: -1
            [4, 3, 2, 1],  # reversed: -1
            [1, 2, 3, 9],  # trailing L-1 dropped -> [1, 2, 3]: 1
            [1, 2, 9, 9],  # only 2 ranks left: NaN
            [
                1,
                9,
                3,
                4,
            ],  # an L-1 in the middle stays: pairs (1,9)+ (1,3)+ (1,4)+ (9,3)- (9,4)- (3,4)+
        ]
    )
    tau = kendall_tau_strict(s, L)
    np.testing.assert_allclose(tau.tolist(), [1, -1, -1, 1, math.nan, 2 / 6], equal_nan=True)
    assert kept_rank_counts(s, L).tolist() == [4, 4, 4, 3, 2, 4]


def test_position_filter_uses_floor():
    s1 = torch.tensor([0, 25, 26, 29])
    assert position_filter(s1, 30).tolist() == [True, True, False, False]  # floor(0.85*30) = 25
    assert position_filter(s1, 30, fraction=0.5).tolist() == [True, False, False, False]


def test_ordering_detects_order_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    ordered = torch.sort(torch.randint(0, 20, (400, 5), generator=g), dim=-1).values
    stats = ordering(ordered, 30, n_permutations=200, seed=1)
    assert stats.mean_tau > 0.8 and stats.null_kept_mean < 0.1 and stats.p_value_kept == 0.0
    assert stats.null_all_mean < 0.1 and stats.p_value_all == 0.0
    assert stats.n_kept == 400 and 0 < stats.frac_strictly_increasing < 1
    again = ordering(ordered, 30, n_permutations=200, seed=1)
    assert again.summary() == stats.summary()
    # random saturation layers: the observed mean sits inside its null
    shuffled = torch.randint(0, 30, (400, 5), generator=g)
    null_stats = ordering(shuffled, 30, n_permutations=200, seed=1)
    assert abs(null_stats.mean_tau - null_stats.null_kept_mean) < 4 * null_stats.null_kept_std
    assert 0.001 < null_stats.p_value_kept < 0.999


def test_ordering_counts_and_filter():
    L = 10
    s = torch.tensor([[1, 2, 3], [9, 9, 9], [8, 9, 9], [2, 2, 5]])  # s_1 <= floor(8.5) = 8 keeps 3
    stats = ordering(s, L, n_permutations=50)
    assert (stats.n_positions, stats.n_passing_filter, stats.n_kept) == (4, 3, 2)
    np.testing.assert_allclose(stats.mean_tau, (1 + (-1 + 1 + 1) / 3) / 2)
    assert stats.frac_strictly_increasing == 0.5
    table = stats.distribution
    assert table.query("rank == 1 and layer == 8")["count"].item() == 1


def test_ordering_errors():
    with pytest.raises(ValueError, match="k >= 3"):
        ordering(torch.zeros(5, 2, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        ordering(torch.full((5, 3), 12), 10)


def test_rank_correspondence_places():
    s = torch.tensor([[1, 2, 3], [3, 2, 1], [1, 1, 2]])
    table = rank_correspondence(s, torch.tensor([3, 3, 3]))
    # places: row0 1,2,3; row1 3,2,1; row2 1.5,1.5,3
    np.testing.assert_allclose(table["mean_place"], [(1 + 3 + 1.5) / 3, (2 + 2 + 1.5) / 3, 7 / 3])
    np.testing.assert_allclose(table["frac_in_place"], [1 / 3, 2 / 3, 2 / 3])


def enumerated_null(s: list[int], n_layers: int, convention: str) -> float:
    """E[τ | kept] over every permutation of one position, by brute force (docs/definitions.md)."""
    from itertools import permutations

    k_kept = int(kept_rank_counts(torch.tensor([s]), n_layers)[0])
    if convention == "kept":  # permute the k' kept values, k' fixed
        taus = [strict_tau(perm) for perm in permutations(s[:k_kept])]
    else:  # permute all k, then the drop rule again
        taus = [brute_tau(list(perm), n_layers) for perm in permutations(s)]
    kept = [t for t in taus if not math.isnan(t)]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("convention", ["kept", "all"])
def test_both_permutation_nulls_match_enumeration(convention):
    L = 30
    s = [2, 5, 29, 7, 29]  # k' = 4: the trailing 29 is dropped, the inner one counts
    expected = enumerated_null(s, L, convention)
    null = permutation_null(
        torch.tensor([s] * 400), L, convention=convention, n_permutations=200, seed=3
    )
    # every permutation mean averages 400 independent shuffles of this one position
    assert null.shape == (200,)
    assert abs(float(null.mean()) - expected) < 0.01
    if convention == "kept":
        assert expected == pytest.approx(0.0)  # distinct values: τ is symmetric
    else:
        assert expected < -0.1  # an inner 29 is discordant with the ranks after it


def test_null_conventions_differ_and_are_seeded():
    g = torch.Generator().manual_seed(4)
    s = torch.randint(0, 30, (300, 5), generator=g)
    s[::3, 3:] = 29  # many trailing L-1 values, as in real scans
    a = permutation_null(s, 30, convention="kept", n_permutations=50, seed=1)
    b = permutation_null(s, 30, convention="all", n_permutations=50, seed=1)
    assert torch.equal(a, permutation_null(s, 30, convention="kept", n_permutations=50, seed=1))
    assert float(b.mean()) < float(a.mean()) - 0.05
    with pytest.raises(ValueError, match="convention"):
        permutation_null(s, 30, convention="both")


def test_ordering_is_the_same_however_the_positions_arrive(monkeypatch):
    """The accumulator fed in uneven pieces gives exactly what one call gives, and both match
    a direct computation (numpy means, a brute-force count of each s_i)."""
    from beyond_top1 import saturation

    monkeypatch.setattr(saturation, "POSITION_BLOCK", 64)  # many blocks in a small test
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 30, (1000, 5), generator=g)
    s[::4, 3:] = 29
    whole = ordering(s, 30, n_permutations=60, seed=5)
    accumulator = saturation.OrderingAccumulator(5, 30, n_permutations=60, seed=5)
    start = 0
    for size in (1, 63, 2, 200, 97, 637):
        accumulator.update(s[start : start + size])
        start += size
        if size == 2:
            accumulator.result()  # a look in between changes nothing
    assert start == len(s)
    pieces = accumulator.result()
    assert pieces.summary() == whole.summary()
    pd.testing.assert_frame_equal(pieces.rank_correspondence, whole.rank_correspondence)
    pd.testing.assert_frame_equal(pieces.distribution, whole.distribution)
    # direct computation
    passing = s[s[:, 0] <= 25].numpy()
    tau = kendall_tau_strict(torch.as_tensor(passing), 30).numpy()
    tau = tau[~np.isnan(tau)]
    assert whole.n_passing_filter == len(passing) and whole.n_kept == len(tau)
    assert whole.mean_tau == pytest.approx(tau.mean(), abs=1e-12)
    assert whole.tau_se == pytest.approx(tau.std(ddof=1) / np.sqrt(len(tau)), rel=1e-9)
    counts = whole.distribution.pivot(index="layer", columns="rank", values="count")
    for j in range(5):
        assert counts[j + 1].tolist() == [int((passing[:, j] == l).sum()) for l in range(30)]
    null = permutation_null(torch.as_tensor(passing), 30, n_permutations=60, seed=5)
    assert whole.null_kept_mean == pytest.approx(float(null.mean()), abs=1e-12)
