"""Ordering-statistics figures draw exactly the numbers in OrderingStats / ScanResult."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import beyond_top1 as bt
from beyond_top1.figures import (
    plot_ordering_comparison,
    plot_rank_correspondence,
    plot_saturation_histograms,
    save_figure,
)

L, K, N = 12, 5, 400


def _ordered_s(seed: int) -> np.ndarray:
    """Mostly increasing s_1 < s_2 < ... (a 'trained' pattern), within 0..L-1."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 6, size=(N, 1))
    steps = rng.integers(0, 3, size=(N, K)).cumsum(1)
    return np.clip(base + steps, 0, L - 1)


def _random_s(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, L, size=(N, K))


@pytest.fixture(scope="module")
def stats():
    return {
        "trained": bt.ordering(_ordered_s(0), L, n_permutations=200),
        "untrained": bt.ordering(_random_s(1), L, n_permutations=200),
    }


def _bar_heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_rank_correspondence_bars(stats):
    fig = plot_rank_correspondence(stats)
    assert isinstance(fig, Figure)
    place_ax, frac_ax = fig.axes[:2]
    want_place = np.concatenate([st.rank_correspondence["mean_place"] for st in stats.values()])
    want_frac = np.concatenate([st.rank_correspondence["frac_in_place"] for st in stats.values()])
    np.testing.assert_allclose(_bar_heights(place_ax), want_place)
    np.testing.assert_allclose(_bar_heights(frac_ax), want_frac)
    single = plot_rank_correspondence(stats["trained"])
    assert len(single.axes[0].patches) == K


def test_saturation_histograms_from_stats(stats):
    st = stats["trained"]
    fig = plot_saturation_histograms(st)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == K
    s = _ordered_s(0)
    kept = s[s[:, 0] <= int(0.85 * L)]  # the filter OrderingStats applies
    for i, ax in enumerate(visible):
        brute = np.bincount(kept[:, i], minlength=L) / len(kept)
        np.testing.assert_allclose(_bar_heights(ax), brute)
        assert ax.get_title() == f"s_{i + 1}"


def test_saturation_histograms_from_scans_overlay_and_relative_depth():
    s_a, s_b = _ordered_s(2), _random_s(3)
    scan_a = _scan(s_a, L)
    scan_b = _scan(np.minimum(s_b, 7), 8)  # a shallower model: depth axis becomes relative
    fig = plot_saturation_histograms({"trained": scan_a, "untrained": scan_b})
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0].get_ydata(), np.bincount(s_a[:, 0], minlength=L) / N)
    np.testing.assert_allclose(lines[1].get_xdata(), np.arange(8) / 7)
    assert fig.axes[-1].get_xlabel() == "layer / (L-1)" or any(
        a.get_xlabel() == "layer / (L-1)" for a in fig.axes
    )


def test_ordering_comparison(stats):
    fig = plot_ordering_comparison(stats)
    tau_ax, frac_ax, mean_ax = fig.axes[:3]
    np.testing.assert_allclose(
        _bar_heights(tau_ax), [st.mean_tau for st in stats.values()], rtol=1e-12
    )
    np.testing.assert_allclose(
        _bar_heights(frac_ax), [st.frac_strictly_increasing for st in stats.values()]
    )
    s = _ordered_s(0)
    kept = s[s[:, 0] <= int(0.85 * L)]
    np.testing.assert_allclose(mean_ax.get_lines()[0].get_ydata(), kept.mean(0) / (L - 1))
    labels = [t.get_text() for t in tau_ax.get_xticklabels()]
    trained, untrained = stats["trained"], stats["untrained"]
    assert trained.p_value_kept == 0 and untrained.p_value_kept > 0.05  # ordered vs. shuffled
    assert trained.p_value_all == 0
    assert labels == [
        f"trained\nn={trained.n_kept}\np(a)<0.005\np(b)<0.005",  # 0 of 200 permutations
        f"untrained\nn={untrained.n_kept}\np(a)={untrained.p_value_kept:.3g}"
        f"\np(b)={untrained.p_value_all:.3g}",
    ]


def test_figures_accept_scan_results_and_save(tmp_path):
    scan = _scan(_ordered_s(4)[:60], L)  # ScanResult.ordering() runs 1000 permutations
    fig = plot_ordering_comparison({"a": scan})
    expected = scan.ordering()
    np.testing.assert_allclose(_bar_heights(fig.axes[0]), [expected.mean_tau])
    png, svg = save_figure(plot_rank_correspondence(scan), tmp_path / "figs" / "rank_corr")
    assert png.stat().st_size > 1000 and svg.read_text().lstrip().startswith("<?xml")
    with pytest.raises(TypeError, match="OrderingStats"):
        plot_rank_correspondence({"x": 3})


def _scan(s: np.ndarray, n_layers: int) -> bt.ScanResult:
    """A ScanResult holding only saturation layers (the figures read nothing else)."""
    n, k = s.shape
    frame = pd.DataFrame({"text_id": np.zeros(n, int), "pos": np.arange(n)})
    for i in range(k):
        frame[f"s_{i + 1}"] = s[:, i]
    return bt.ScanResult(
        saturation=frame,
        top_ids=np.zeros((n, n_layers, k), np.int32),
        final_ranks=np.ones((n, n_layers, k), np.int32),
        top_logprobs=np.zeros((n, n_layers, k), np.float32),
        resid_cos=np.zeros((n, n_layers), np.float32),
    )
