"""Simulated early exit (001, 004): criteria on hand-made trajectories, metrics, the better-LM
test, and the streaming signal pass on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from beyond_top1.early_exit import (
    ExitSignals,
    best_at_budget,
    better_language_modeling,
    collect_exit_signals,
    confidence_threshold_004,
    early_exit_curves,
    exit_layers,
    first_firing_layer,
    layers_saved_table,
    load_exit_signals,
    simulate_exit,
    two_proportion_ztest,
)

L = 5

# Three positions, five layers. Final top-2 = (10, 11), (20, 21), (30, 31); gold 10, 21, 99.
TOP1_LOGIT = np.array(
    [
        [7, 10, 10, 10, 10],  # s_1 = 1
        [20, 5, 20, 20, 20],  # s_1 = 2 (breaks at layer 1)
        [1, 2, 3, 4, 30],  # s_1 = 4 = L-1
    ]
)
TOP1_LINEAR = np.array(
    [
        [10, 10, 10, 10, 10],  # s_1 = 0
        [20, 20, 20, 20, 20],
        [30, 30, 3, 30, 30],  # s_1 = 3
    ]
)
MARGIN_LOGIT = np.array(
    [
        [0.10, 0.50, 0.70, 0.90, 0.95],
        [0.60, 0.20, 0.30, 0.80, 0.90],
        [0.00, 0.00, 0.10, 0.20, 0.30],
    ],
    dtype=np.float32,
)
MARGIN_LINEAR = np.array(
    [
        [0.80, 0.90, 0.90, 0.90, 0.95],
        [0.50, 0.60, 0.70, 0.80, 0.90],
        [0.40, 0.00, 0.10, 0.20, 0.30],
    ],
    dtype=np.float32,
)
COS = np.array(
    [
        [0.20, 0.95, 0.99, 0.99, 0.99],
        [0.50, 0.50, 0.97, 0.99, 0.99],
        [0.10, 0.20, 0.30, 0.40, 0.50],
    ],
    dtype=np.float32,
)
PROBE_SETTLED = np.array(
    [
        [0.10, 0.40, 0.60, 0.90, 0.95],
        [0.30, 0.70, 0.20, 0.20, 0.80],
        [0.00, 0.10, 0.10, 0.10, 0.10],
    ],
    dtype=np.float32,
)
PROBE_TASK = np.array(
    [
        [1, 1, 2, 3, 3],  # task >= 2 from layer 2
        [1, 3, 1, 1, 2],  # first >= 2 at layer 1
        [1, 1, 1, 1, 1],  # never
    ]
)


def hand_signals() -> ExitSignals:
    return ExitSignals(
        n_layers=L,
        text_id=np.array([0, 0, 1]),
        pos=np.array([0, 5, 2]),
        gold=np.array([10, 21, 99]),
        final_ids=np.array([[10, 11], [20, 21], [30, 31]]),
        top1={"logit": TOP1_LOGIT.copy(), "linear": TOP1_LINEAR.copy()},
        margin={"logit": MARGIN_LOGIT.copy(), "linear": MARGIN_LINEAR.copy()},
        saturation={
            "logit": np.array([[1, 4], [2, 0], [4, 4]]),
            "linear": np.array([[0, 4], [0, 1], [3, 4]]),
        },
        resid_cos=COS.copy(),
        probe_task=PROBE_TASK.copy(),
        probe_settled=PROBE_SETTLED.copy(),
    )


# ------------------------------------------------------------------ criteria on hand-made data


def test_first_firing_layer_matches_a_loop():
    rng = np.random.default_rng(0)
    fires = rng.random((200, 7)) < 0.15
    expected = []
    for row in fires:
        hits = [l for l, f in enumerate(row) if f]
        expected.append(hits[0] if hits else 6)
    assert first_firing_layer(fires).tolist() == expected


def test_oracle_exits_at_each_lens_own_s1_with_precision_one():
    s = hand_signals()
    assert exit_layers(s, "oracle", "logit").tolist() == [1, 2, 4]
    assert exit_layers(s, "oracle", "linear").tolist() == [0, 0, 3]
    for lens in ("logit", "linear"):
        result = simulate_exit(s, "oracle", lens)
        assert result.precision_at_1 == 1.0
    assert simulate_exit(s, "oracle", "logit").mean_layers == pytest.approx((2 + 3 + 5) / 3)
    assert simulate_exit(s, "oracle", "linear").mean_layers == pytest.approx((1 + 1 + 4) / 3)


def test_margin_criterion_by_hand():
    s = hand_signals()
    assert exit_layers(s, "margin", "logit", 0.5).tolist() == [1, 0, 4]
    assert exit_layers(s, "margin", "logit", 0.85).tolist() == [3, 4, 4]
    assert exit_layers(s, "margin", "linear", 0.5).tolist() == [0, 0, 4]
    r = simulate_exit(s, "margin", "logit", 0.5)
    # Predictions: logit top-1 at layers 1, 0, 4 -> 10, 20, 30.
    assert r.prediction.tolist() == [10, 20, 30]
    assert r.precision_at_1 == 1.0
    assert r.accuracy == pytest.approx(1 / 3)
    assert r.mean_layers == pytest.approx((2 + 1 + 5) / 3)
    r = simulate_exit(s, "margin", "logit", 0.05)  # exits at 0, 0, 2: 7, 20, 3
    assert r.prediction.tolist() == [7, 20, 3]
    assert r.precision_at_1 == pytest.approx(1 / 3)


def test_cosine_criterion_by_hand_uses_the_lens_only_for_the_prediction():
    s = hand_signals()
    assert exit_layers(s, "cosine", "logit", 0.96).tolist() == [2, 2, 4]
    assert exit_layers(s, "cosine", "linear", 0.96).tolist() == [2, 2, 4]
    assert simulate_exit(s, "cosine", "logit", 0.9).prediction.tolist() == [10, 20, 30]
    assert simulate_exit(s, "cosine", "linear", 0.0).prediction.tolist() == [10, 20, 30]
    assert simulate_exit(s, "cosine", "logit", 0.0).prediction.tolist() == [7, 20, 1]


def test_probe_criterion_by_hand():
    s = hand_signals()
    assert exit_layers(s, "probe").tolist() == [2, 1, 4]
    r = simulate_exit(s, "probe", "logit")
    assert r.prediction.tolist() == [10, 5, 30]
    assert r.precision_at_1 == pytest.approx(2 / 3)
    s.probe_task = None
    with pytest.raises(ValueError, match="no probe predictions"):
        exit_layers(s, "probe")


def test_probe_confidence_criterion_by_hand():
    s = hand_signals()
    assert exit_layers(s, "probe_conf", "logit", 0.5).tolist() == [2, 1, 4]
    assert exit_layers(s, "probe_conf", "logit", 0.85).tolist() == [3, 4, 4]
    assert simulate_exit(s, "probe_conf", "linear", 0.85).prediction.tolist() == [10, 20, 30]
    s.probe_settled = None
    with pytest.raises(ValueError, match="no probe probabilities"):
        exit_layers(s, "probe_conf", "logit", 0.5)
    assert "probe_conf" not in set(early_exit_curves(s).method)


def test_confidence_004_threshold_and_criterion_by_hand():
    # λ_t = 0.9 λ + 0.1 exp(-4 t / N)
    assert confidence_threshold_004(0.5, [0], 10.0)[0] == pytest.approx(0.55)
    assert confidence_threshold_004(0.5, [5], 10.0)[0] == pytest.approx(0.45 + 0.1 * math.exp(-2))
    s = hand_signals()
    n = s.mean_input_length()
    assert n == pytest.approx((1 + 6 + 3) / 3)
    thresholds = confidence_threshold_004(0.5, s.pos, n)
    # position 0: 0.55 -> margin 0.70 at layer 2; position 5: ~0.4502 -> 0.60 at layer 0;
    # position 2: never (max 0.30).
    assert exit_layers(s, "confidence_004", "logit", 0.5).tolist() == [2, 0, 4]
    manual = [
        next((l for l in range(L) if MARGIN_LOGIT[i, l] > thresholds[i]), L - 1) for i in range(3)
    ]
    assert manual == [2, 0, 4]
    # Strict inequality, as in 004's code: a margin equal to the threshold does not exit.
    s.margin["logit"] = MARGIN_LOGIT.astype(np.float64)
    s.margin["logit"][0, 1] = confidence_threshold_004(0.5, [0], n)[0]
    assert exit_layers(s, "confidence_004", "logit", 0.5)[0] == 2
    s.margin["logit"][0, 1] += 1e-9
    assert exit_layers(s, "confidence_004", "logit", 0.5)[0] == 1


def test_fixed_exit_and_errors():
    s = hand_signals()
    assert exit_layers(s, "fixed", "logit", 3).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="needs a threshold"):
        exit_layers(s, "margin", "logit")
    with pytest.raises(ValueError, match="unknown method"):
        exit_layers(s, "entropy", "logit", 0.5)
    with pytest.raises(KeyError, match="no lens"):
        exit_layers(s, "margin", "tuned", 0.5)


def test_never_firing_predicts_the_final_top1_and_uses_all_layers():
    s = hand_signals()
    r = simulate_exit(s, "margin", "logit", 2.0)
    assert r.exit_layer.tolist() == [L - 1] * 3
    assert r.prediction.tolist() == s.final_top1.tolist()
    assert r.mean_layers == L and r.fraction_saved == 0.0


# ------------------------------------------------------------------ aliasing, sweeps, tables


def test_methods_do_not_share_arrays():
    s = hand_signals()
    before = {k: v.copy() for k, v in s.top1.items()}
    results = [
        simulate_exit(s, "margin", "logit", 2.0),  # never fires: predictions = final top-1
        simulate_exit(s, "cosine", "logit", 2.0),
        simulate_exit(s, "oracle", "logit"),
        simulate_exit(s, "probe", "logit"),
        simulate_exit(s, "confidence_004", "linear", 0.3),
    ]
    snapshots = [(r.prediction.copy(), r.exit_layer.copy()) for r in results]
    results[0].prediction[:] = -7
    results[0].exit_layer[:] = -7
    for r, (pred, layers) in zip(results[1:], snapshots[1:], strict=True):
        assert r.prediction.tolist() == pred.tolist()
        assert r.exit_layer.tolist() == layers.tolist()
    for name in s.top1:
        assert s.top1[name].tolist() == before[name].tolist()
    assert s.final_top1.tolist() == [10, 20, 30]
    for a in results:
        for b in results:
            if a is not b:
                assert not np.shares_memory(a.prediction, b.prediction)
        assert not np.shares_memory(a.prediction, s.final_ids)
        assert not np.shares_memory(a.exit_layer, s.saturation["logit"])


def random_signals(seed: int = 0, n: int = 300, n_layers: int = 8) -> ExitSignals:
    rng = np.random.default_rng(seed)
    top1 = rng.integers(0, 4, size=(n, n_layers))
    final = np.stack([top1[:, -1], (top1[:, -1] + 1) % 4], axis=1)
    from beyond_top1.saturation import saturation_layers

    sat = saturation_layers(torch.as_tensor(np.stack([top1, top1], axis=-1))).numpy()
    return ExitSignals(
        n_layers=n_layers,
        text_id=np.zeros(n, dtype=np.int64),
        pos=rng.integers(0, 40, size=n),
        gold=rng.integers(0, 4, size=n),
        final_ids=final,
        top1={"logit": top1},
        margin={"logit": rng.random((n, n_layers)).astype(np.float32)},
        saturation={"logit": sat},
        resid_cos=rng.random((n, n_layers)).astype(np.float32),
        probe_task=rng.integers(1, 4, size=(n, n_layers)),
        probe_settled=rng.random((n, n_layers)).astype(np.float32),
    )


@pytest.mark.parametrize("method", ["probe_conf", "margin", "cosine", "confidence_004", "fixed"])
def test_theta_sweeps_are_monotone_in_layers_used(method):
    s = random_signals()
    curves = early_exit_curves(s, methods=[method])
    rows = curves[curves.method == method].sort_values("theta")
    assert len(rows) >= 8
    assert np.all(np.diff(rows.mean_layers.to_numpy()) >= 0)
    # Per position, too: a higher threshold never exits earlier.
    thetas = rows.theta.to_numpy()
    prev = None
    for theta in thetas:
        layers = exit_layers(s, method, "logit", theta)
        if prev is not None:
            assert np.all(layers >= prev)
        prev = layers


def test_oracle_precision_one_on_random_trajectories():
    s = random_signals(seed=3)
    assert simulate_exit(s, "oracle", "logit").precision_at_1 == 1.0


def test_curves_and_layers_saved_table():
    s = hand_signals()
    curves = early_exit_curves(s, thetas={"margin": [0.05, 0.5, 0.85]})
    methods = {"full", "oracle", "probe", "probe_conf", "margin", "cosine", "confidence_004"}
    methods.add("fixed")
    assert set(curves.method) == methods
    full = curves[curves.method == "full"].iloc[0]
    assert full.mean_layers == L and full.accuracy == pytest.approx(1 / 3)
    table = layers_saved_table(curves)
    margin = table[(table.method == "margin") & (table.lens == "logit")].iloc[0]
    # θ = 0.5 reaches P@1 = 1 with (2+1+5)/3 layers; θ = 0.05 does not reach 95%.
    assert margin.theta_at_95 == 0.5
    assert margin.saved_at_95 == pytest.approx(1 - (8 / 3) / L)
    assert margin.saved_at_99 == pytest.approx(1 - (8 / 3) / L)
    probe = table[(table.method == "probe") & (table.lens == "logit")].iloc[0]
    assert math.isnan(probe.saved_at_95)  # P@1 = 2/3


def test_layers_saved_picks_fewest_layers_among_points_reaching_the_target():
    curves = pd.DataFrame(
        [
            {"method": "full", "lens": "-", "theta": None, "precision_at_1": 1.0,
             "accuracy": 0.5, "mean_layers": 10.0},
            {"method": "m", "lens": "a", "theta": 0.1, "precision_at_1": 0.90,
             "accuracy": 0.4, "mean_layers": 3.0},
            {"method": "m", "lens": "a", "theta": 0.2, "precision_at_1": 0.96,
             "accuracy": 0.45, "mean_layers": 5.0},
            {"method": "m", "lens": "a", "theta": 0.3, "precision_at_1": 0.95,
             "accuracy": 0.45, "mean_layers": 6.0},
            {"method": "m", "lens": "a", "theta": 0.4, "precision_at_1": 0.995,
             "accuracy": 0.5, "mean_layers": 8.0},
        ]
    )  # fmt: skip
    row = layers_saved_table(curves).iloc[0]
    assert row.theta_at_95 == 0.2 and row.saved_at_95 == pytest.approx(0.5)
    assert row.theta_at_99 == 0.4 and row.saved_at_99 == pytest.approx(0.2)


# ------------------------------------------------------------------ better language modeling


def test_two_proportion_ztest_textbook_value():
    # 45/100 vs 60/100: pooled p = 0.525, SE = sqrt(0.525·0.475·0.02) = 0.0706222,
    # z = -0.15 / 0.0706222 = -2.12398, two-sided p = 0.03367 (normal table).
    z, p = two_proportion_ztest(45, 100, 60, 100)
    assert z == pytest.approx(-2.12398, abs=1e-4)
    assert p == pytest.approx(0.03367, abs=2e-5)
    assert all(math.isnan(v) for v in two_proportion_ztest(0, 0, 1, 2))


def test_better_language_modeling_counts_by_hand():
    n_layers = 10
    # final top-2, gold, s_2 -> top-1 wrong? early/late? rank-2 gold?
    rows = [
        ((1, 2), 2, 0),  # wrong, early (0 <= 9-6=3), rank-2 right
        ((1, 2), 2, 3),  # wrong, early, right
        ((1, 2), 5, 2),  # wrong, early, rank-2 wrong
        ((1, 2), 1, 0),  # top-1 right: excluded
        ((1, 2), 2, 9),  # wrong, late, right
        ((1, 2), 7, 9),  # wrong, late, wrong
        ((1, 2), 8, 9),  # wrong, late, wrong
        ((1, 2), 2, 5),  # wrong, neither (4..8): excluded
    ]
    n = len(rows)
    s = ExitSignals(
        n_layers=n_layers,
        text_id=np.zeros(n, dtype=np.int64),
        pos=np.arange(n),
        gold=np.array([r[1] for r in rows]),
        final_ids=np.array([r[0] for r in rows]),
        top1={"logit": np.zeros((n, n_layers), dtype=np.int64)},
        margin={"logit": np.zeros((n, n_layers), dtype=np.float32)},
        saturation={"logit": np.array([[0, r[2]] for r in rows])},
        resid_cos=np.zeros((n, n_layers), dtype=np.float32),
    )
    result = better_language_modeling(s, m=6)
    counts = (result.n_early, result.correct_early, result.n_late, result.correct_late)
    assert counts == (3, 2, 3, 1)
    assert result.n_top1_wrong == 7
    z, p = two_proportion_ztest(2, 3, 1, 3)
    assert result.z == pytest.approx(z) and result.p_value == pytest.approx(p)
    assert "s_2 <= 3" in result.summary()


# ------------------------------------------------------------------ the streaming pass


class StubProbe:
    """Hand-made task probe: task 2 when the first feature is positive, else 1."""

    def __init__(self):
        self.calls = 0

    def predict(self, X):
        self.calls += 1
        X = np.asarray(X)
        assert X.ndim == 2
        return np.where(X[:, 0] > 0, 2, 1)


@pytest.fixture(scope="module")
def tiny_signals(tiny_model):
    from beyond_top1.lenses import LinearShortcutLens, LogitLens

    texts = ["The cat sat on the mat.", "Paris is the capital of France, and", "One two three"]
    linear = LinearShortcutLens.fit(tiny_model, texts, progress=False)
    probe = StubProbe()
    lenses = {"logit": LogitLens(tiny_model), "linear": linear}
    signals = collect_exit_signals(
        tiny_model, texts, lenses, probe=probe, batch_size=2, progress=False
    )
    return signals, texts, lenses, probe


def test_collected_signals_match_a_direct_computation(tiny_model, tiny_signals):
    from beyond_top1 import hooked
    from beyond_top1.data import tokenize

    signals, texts, lenses, probe = tiny_signals
    L = hooked.n_layers(tiny_model)
    ids = tokenize(tiny_model, texts[1])
    rows = np.flatnonzero(signals.text_id == 1)
    # position 0 (the sink) is not scored, the last token has no gold
    assert signals.pos[rows].tolist() == list(range(1, len(ids) - 1))
    assert signals.gold[rows].tolist() == ids[2:]
    with torch.inference_mode():
        resid = hooked.run_with_residuals(tiny_model, torch.tensor([ids]), tuple(range(-1, L)))[0]
        resid = resid[1:]  # the scored positions, and the last one
        logits = tiny_model(torch.tensor([ids]), return_type="logits")[0][1:]
        assert signals.final_top1[rows].tolist() == logits[:-1].argmax(-1).tolist()
        for name, lens in lenses.items():
            for layer in range(L):
                lp = lens(resid[:-1, layer + 1], layer).log_softmax(-1)
                top = lp.topk(2, dim=-1)
                assert signals.top1[name][rows, layer].tolist() == top.indices[:, 0].tolist()
                margin = top.values[:, 0].exp() - top.values[:, 1].exp()
                np.testing.assert_allclose(signals.margin[name][rows, layer], margin, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(resid[:-1, 1:], resid[:-1, :-1], dim=-1)
    np.testing.assert_allclose(signals.resid_cos[rows], cos, atol=1e-5)
    assert probe.calls > 0
    expected_tasks = probe.predict(resid[:-1, 1:].reshape(-1, resid.shape[-1]).numpy())
    assert signals.probe_task[rows].reshape(-1).tolist() == expected_tasks.tolist()


def test_oracle_precision_one_and_probe_stub_on_a_real_pass(tiny_signals):
    signals = tiny_signals[0]
    for lens in signals.lenses:
        assert simulate_exit(signals, "oracle", lens).precision_at_1 == 1.0
    probe = simulate_exit(signals, "probe", "logit")
    assert probe.exit_layer.tolist() == first_firing_layer(signals.probe_task >= 2).tolist()
    curves = early_exit_curves(signals)
    assert {"probe", "oracle", "margin"} <= set(curves.method)
    full = curves[curves.method == "full"].iloc[0]
    never = simulate_exit(signals, "margin", "linear", 2.0)
    assert never.accuracy == pytest.approx(full.accuracy)


def test_signals_save_and_load_round_trip(tiny_signals, tmp_path):
    signals = tiny_signals[0]
    loaded = load_exit_signals(signals.save(tmp_path / "sig"))
    assert loaded.lenses == signals.lenses and loaded.n_layers == signals.n_layers
    for name in signals.lenses:
        assert np.array_equal(loaded.top1[name], signals.top1[name])
        assert np.array_equal(loaded.margin[name], signals.margin[name])
    assert np.array_equal(loaded.probe_task, signals.probe_task)
    pd.testing.assert_frame_equal(early_exit_curves(loaded), early_exit_curves(signals))
    with pytest.raises(FileNotFoundError, match="signals.npz"):
        load_exit_signals(tmp_path / "nothing")


def test_a_fitted_task_probe_plugs_into_the_probe_criterion(tiny_model):
    """The real TaskProbe (branch probes) through the duck-typed interface."""
    from beyond_top1 import hooked
    from beyond_top1.data import tokenize
    from beyond_top1.probes import TaskProbe

    text = "The cat sat on the mat, and then it slept."
    L = hooked.n_layers(tiny_model)
    ids = tokenize(tiny_model, text)
    with torch.inference_mode():
        resid = hooked.run_with_residuals(tiny_model, torch.tensor([ids]), tuple(range(L)))[0]
    X = resid.reshape(-1, resid.shape[-1]).numpy()
    y = np.tile(np.arange(1, L + 1), len(ids))  # "task" = layer + 1: learnable, 3 classes
    probe = TaskProbe().fit(X, y)
    signals = collect_exit_signals(tiny_model, [text], probe=probe, progress=False)
    scored = resid[1:-1]  # not position 0 (the sink), not the last (no gold)
    expected = probe.predict(scored.reshape(-1, resid.shape[-1]).numpy()).reshape(-1, L)
    assert signals.probe_task.tolist() == expected.tolist()
    assert probe.predict_resid(resid[0]).tolist() == probe.predict(resid[0].numpy()).tolist()
    r = simulate_exit(signals, "probe", "logit")
    assert r.exit_layer.tolist() == first_firing_layer(expected >= 2).tolist()
    proba = probe.predict_proba(scored.reshape(-1, resid.shape[-1]).numpy())
    settled = proba[:, probe.classes_ >= 2].sum(1).reshape(-1, L)
    np.testing.assert_allclose(signals.probe_settled, settled, rtol=1e-5, atol=1e-6)
    r = simulate_exit(signals, "probe_conf", "logit", 0.7)
    assert r.exit_layer.tolist() == first_firing_layer(settled >= 0.7).tolist()


def test_min_layer_delays_every_checked_criterion():
    s = hand_signals()
    assert exit_layers(s, "margin", "logit", 0.5, min_layer=2).tolist() == [2, 3, 4]
    assert exit_layers(s, "probe", min_layer=2).tolist() == [2, 4, 4]
    assert exit_layers(s, "cosine", "logit", 0.0, min_layer=3).tolist() == [3, 3, 3]
    assert simulate_exit(s, "margin", "logit", 0.5, min_layer=2).mean_layers == pytest.approx(4)
    assert s.probe_task.tolist() == PROBE_TASK.tolist()  # the signals are not modified


def test_best_at_budget_compares_at_equal_compute():
    s = hand_signals()
    curves = early_exit_curves(s, thetas={"margin": [0.05, 0.5, 0.85]})
    best = best_at_budget(curves, 8 / 3)
    assert (best.mean_layers <= 8 / 3 + 1e-9).all()
    margin = best[(best.method == "margin") & (best.lens == "logit")].iloc[0]
    assert margin.theta == 0.5 and margin.precision_at_1 == 1.0
    assert best_at_budget(curves, 0.5).empty


def test_with_probe_recomputes_only_the_probe_signals(tiny_model, tiny_signals):
    from beyond_top1.early_exit import with_probe

    signals, texts, _, _ = tiny_signals

    class Other:
        def predict(self, X):
            return np.where(np.asarray(X)[:, 1] > 0, 3, 1)

    swapped = with_probe(signals, tiny_model, texts, Other(), batch_size=2, progress=False)
    assert swapped.top1["logit"] is signals.top1["logit"]  # lens signals are reused
    assert swapped.probe_task.shape == signals.probe_task.shape
    assert not np.array_equal(swapped.probe_task, signals.probe_task)
    again = with_probe(signals, tiny_model, texts, StubProbe(), batch_size=1, progress=False)
    assert np.array_equal(again.probe_task, signals.probe_task)
    with pytest.raises(ValueError, match="same texts"):
        with_probe(signals, tiny_model, texts[:2], Other(), progress=False)


def test_bf16_margins_stay_within_the_tolerance_of_fp32(smollm2, monkeypatch):
    """bf16 bounds the normaliser only loosely: margins it cannot vouch for are re-read."""
    from beyond_top1 import ranking
    from beyond_top1.early_exit import MARGIN_TOLERANCE

    monkeypatch.setenv(ranking.BF16_ENV, "emulate")
    texts = ["The cat sat on the mat.", "Paris is the capital of France, and"]
    fp32 = collect_exit_signals(smollm2, texts, precision="fp32", progress=False)
    bf16 = collect_exit_signals(smollm2, texts, precision="bf16", progress=False)
    assert np.array_equal(bf16.top1["logit"], fp32.top1["logit"])
    gap = np.abs(bf16.margin["logit"].astype(np.float64) - fp32.margin["logit"])
    assert gap.max() <= MARGIN_TOLERANCE + 1e-6
    reread = bf16.settings["rows_reread_in_fp32"]
    assert 0 < reread < fp32.margin["logit"].size  # (position, layer) rows, not whole positions


def test_a_scan_of_named_lenses_keeps_their_names_and_kinds(tiny_model, tiny_signals):
    from beyond_top1.early_exit import ExitSignals
    from beyond_top1.scans import scan

    _, texts, lenses, _ = tiny_signals
    named = {"first": lenses["linear"], "second": lenses["logit"]}
    result = scan(tiny_model, texts, lens=named, k=2, lens_source="given", progress=False)
    assert result.lens_names == ("first", "second")
    alone = scan(tiny_model, texts, lens=lenses["linear"], k=2, progress=False)
    np.testing.assert_array_equal(result.lens_arrays("first")["top_ids"], alone.top_ids)
    signals = ExitSignals.from_scan(result)
    assert signals.lenses == ("first", "second")
    assert signals.settings["lenses"] == {"first": "linear", "second": "logit"}
