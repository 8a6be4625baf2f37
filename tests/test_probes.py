"""Task labels, probe rows, the TaskProbe estimator and grouped cross-validation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_model

from beyond_top1 import hooked
from beyond_top1.data import iter_token_batches, wiki_texts
from beyond_top1.probes import (
    EXCLUDED,
    ProbeFileError,
    TaskDataset,
    TaskProbe,
    cross_validate_task_probe,
    load_probe,
    task_dataset,
    task_labels,
)
from beyond_top1.scans import ScanResult, texts_fingerprint

# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def reference_label(s: list[int], layer: int) -> int:
    """docs/definitions.md spelled out: task i iff exactly ranks 1..i-1 are saturated (s_j < l)."""
    saturated = [value < layer for value in s]
    for i in range(1, len(s) + 1):
        if all(saturated[: i - 1]) and not any(saturated[i - 1 :]):
            return i
    return EXCLUDED  # out of order, or all k ranks saturated


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        # in order: task 1 up to s_1, task 2 up to s_2, task 3 up to s_3, then beyond k
        ((3, 7, 12), {**dict.fromkeys(range(0, 4), 1), **dict.fromkeys(range(4, 8), 2),
                      **dict.fromkeys(range(8, 13), 3), **dict.fromkeys(range(13, 20), 0)}),
        # rank 2 fixed (layer 3) before rank 1 (layer 8): layers 4..8 are ambiguous
        ((8, 3, 12), {**dict.fromkeys(range(0, 4), 1), **dict.fromkeys(range(4, 9), 0),
                      **dict.fromkeys(range(9, 13), 3), **dict.fromkeys(range(13, 20), 0)}),
        # rank 3 done (5) before rank 2 (8): layers 6..8 are ambiguous, not "task 2"
        ((2, 8, 5), {**dict.fromkeys(range(0, 3), 1), **dict.fromkeys(range(3, 6), 2),
                     **dict.fromkeys(range(6, 20), 0)}),
        # a tie: task 2 has no layer of its own
        ((4, 4, 9), {**dict.fromkeys(range(0, 5), 1), **dict.fromkeys(range(5, 10), 3),
                     **dict.fromkeys(range(10, 20), 0)}),
        # everything fixed from layer 0: only layer 0 is labelled (task 1)
        ((0, 0, 0), {0: 1, **dict.fromkeys(range(1, 20), 0)}),
        # ranks that settle only at the last layer: tasks run to L-1
        ((19, 19, 19), dict.fromkeys(range(20), 1)),
        ((5, 19, 19), {**dict.fromkeys(range(0, 6), 1), **dict.fromkeys(range(6, 20), 2)}),
    ],
)  # fmt: skip
def test_task_labels_hand_made(s, expected):
    labels = task_labels(np.array([s]), range(20), 20)[0]
    assert labels.tolist() == [expected[l] for l in range(20)]
    assert labels.tolist() == [reference_label(list(s), l) for l in range(20)]


def test_task_labels_match_reference_and_formula_on_random_inputs():
    rng = np.random.default_rng(0)
    L, k = 12, 4
    s = rng.integers(0, L, size=(300, k))
    s[:150].sort(axis=1)  # half in order, half mostly not
    layers = [0, 2, 3, 5, 7, 11]
    labels = task_labels(s, layers, L)
    assert labels.shape == (300, len(layers))
    for n in range(300):
        for j, layer in enumerate(layers):
            label = labels[n, j]
            assert label == reference_label(s[n].tolist(), layer)
            if label:  # the formula of docs/definitions.md, s_{i-1} < l <= s_i (s_0 = -1) holds
                lower = -1 if label == 1 else s[n, label - 2]
                assert lower < layer <= s[n, label - 1]
    assert (labels[:150] > 0).mean() > (labels[150:] > 0).mean()  # disorder excludes layers


def test_task_labels_reject_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        task_labels(np.array([[3, 10]]), range(10), 10)
    with pytest.raises(ValueError, match="layers must lie"):
        task_labels(np.array([[3, 5]]), [10], 10)
    with pytest.raises(ValueError, match="shape"):
        task_labels(np.array([3, 5]), range(10), 10)


# ---------------------------------------------------------------------------------------------
# Probe rows from a (hand-made) scan
# ---------------------------------------------------------------------------------------------

L_TINY = 6
MAX_LEN = 24
BATCH = 3


@pytest.fixture(scope="module")
def tiny6():
    return make_tiny_model(n_layers=L_TINY, d_model=32, seed=2)


@pytest.fixture(scope="module")
def texts():
    return wiki_texts(8, split="val", seed=1)


def fake_scan(model, texts, *, k=3, seed=0, ordered=0.7) -> ScanResult:
    """A ScanResult whose rows are exactly the positions stream_residuals yields, with made-up
    saturation layers (mostly ordered) so that every label is known."""
    rows = []
    for batch in iter_token_batches(model, texts, batch_size=BATCH, max_len=MAX_LEN):
        r, c = batch.scored.nonzero(as_tuple=True)
        for row, col in zip(r.tolist(), c.tolist(), strict=True):
            rows.append((int(batch.text_ids[row]), col, int(batch.tokens[row, col])))
    L = hooked.n_layers(model)
    rng = np.random.default_rng(seed)
    s = rng.integers(0, L, size=(len(rows), k))
    ordered_rows = rng.random(len(rows)) < ordered
    s[ordered_rows] = np.sort(s[ordered_rows], axis=1)
    frame = pd.DataFrame(rows, columns=["text_id", "pos", "token_id"])
    frame["next_token_id"] = -1
    for i in range(k):
        frame[f"top_{i + 1}_id"] = 7
    for i in range(k):
        frame[f"s_{i + 1}"] = s[:, i]
    n = len(frame)
    settings = {
        "model_name": hooked.model_name(model),
        "unembedding_fingerprint": hooked.unembedding_fingerprint(model),
        "n_layers": L,
        "k": k,
        "batch_size": BATCH,
        "max_len": MAX_LEN,
        "n_texts": len(texts),
        "texts_sha256": texts_fingerprint(texts),
        "lens": "logit",
        "score_first": False,
    }
    return ScanResult(
        frame,
        np.zeros((n, L, k), np.int32),
        np.ones((n, L, k), np.int32),
        np.zeros((n, L, k), np.float32),
        np.zeros((n, L), np.float32),
        settings,
    )


def reference_residuals(model, texts) -> dict[tuple[int, int], torch.Tensor]:
    """(text_id, pos) -> [L, d] resid_post, one text at a time with run_with_cache."""
    out = {}
    for batch in iter_token_batches(model, texts, batch_size=1, max_len=MAX_LEN):
        _, cache = model.run_with_cache(batch.tokens)
        stacked = torch.stack(
            [cache[f"blocks.{l}.hook_resid_post"][0] for l in range(L_TINY)], dim=1
        )
        for pos in range(batch.tokens.shape[1]):
            out[int(batch.text_ids[0]), pos] = stacked[pos]
    return out


def test_task_dataset_rows_features_and_balance(tiny6, texts):
    scan = fake_scan(tiny6, texts)
    data = task_dataset(tiny6, scan, texts, n_tasks=3, progress=False)
    assert len(data) > 50
    s = scan.saturation_array()
    limit = math.floor(0.85 * L_TINY)
    # labels, text ids and positions come from the scan rows
    np.testing.assert_array_equal(data.groups, scan.saturation["text_id"].to_numpy()[data.rows])
    np.testing.assert_array_equal(data.positions, scan.saturation["pos"].to_numpy()[data.rows])
    for row, layer, label in zip(data.rows, data.layers, data.y, strict=True):
        assert s[row, 0] <= limit  # the position filter
        assert label == reference_label(s[row].tolist(), int(layer)) != EXCLUDED
    # features are resid_post at that layer and position
    ref = reference_residuals(tiny6, texts)
    expected = np.stack(
        [
            ref[int(t), int(p)][int(l)].numpy()
            for t, p, l in zip(data.groups, data.positions, data.layers, strict=True)
        ]
    )
    np.testing.assert_allclose(data.X, expected, atol=1e-5, rtol=1e-5)
    # balanced per layer: every task equally often at each layer, and no layer lacks a task
    counts = data.counts()
    assert (counts.nunique(axis=1) == 1).all() and (counts > 0).all().all()
    # a layer is kept only if all three tasks occur there; then at the smallest count
    available = data.available.pivot(index="layer", columns="task", values="count")
    full = available[(available > 0).all(axis=1)]
    assert counts.index.tolist() == full.index.tolist()
    assert counts[1].tolist() == full.min(axis=1).tolist()


def test_task_dataset_options_are_seeded_and_respected(tiny6, texts):
    scan = fake_scan(tiny6, texts)
    a = task_dataset(tiny6, scan, texts, n_tasks=3, max_per_class=4, min_layer=2, progress=False)
    b = task_dataset(tiny6, scan, texts, n_tasks=3, max_per_class=4, min_layer=2, progress=False)
    c = task_dataset(
        tiny6, scan, texts, n_tasks=3, max_per_class=4, min_layer=2, seed=1, progress=False
    )
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.rows, c.rows)
    assert a.layers.min() >= 2 and (a.counts() <= 4).all().all()
    rms = task_dataset(
        tiny6, scan, texts, n_tasks=2, features="rms", max_per_class=4, min_layer=2, progress=False
    )
    assert set(rms.y.tolist()) == {1, 2}
    np.testing.assert_allclose(np.sqrt((rms.X.astype(np.float64) ** 2).mean(1)), 1.0, rtol=1e-4)
    unbalanced = task_dataset(tiny6, scan, texts, n_tasks=3, balance=False, progress=False)
    labels = task_labels(scan.saturation_array()[:, :3], range(L_TINY), L_TINY)
    kept = scan.saturation_array()[:, 0] <= math.floor(0.85 * L_TINY)
    assert len(unbalanced) == int((labels[kept] > 0).sum())


def test_task_dataset_refuses_other_texts_or_model(tiny6, texts):
    scan = fake_scan(tiny6, texts)
    with pytest.raises(ValueError, match="same texts"):
        task_dataset(tiny6, scan, texts[::-1], progress=False)
    with pytest.raises(ValueError, match="another model"):
        task_dataset(make_tiny_model(n_layers=L_TINY, seed=9), scan, texts, progress=False)
    with pytest.raises(ValueError, match="n_tasks must be between 2"):
        task_dataset(tiny6, scan, texts, n_tasks=4, progress=False)
    with pytest.raises(ValueError, match="no probe rows for n_tasks=3: no layer has all"):
        task_dataset(tiny6, scan, texts, n_tasks=3, layers=[0], progress=False)


# ---------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------


def synthetic(n_texts=40, per_text=12, k=3, d=16, signal=1.5, seed=0) -> TaskDataset:
    """Rows whose label is linearly readable (``signal`` > 0) with text and layer ids."""
    rng = np.random.default_rng(seed)
    n = n_texts * per_text
    y = rng.integers(1, k + 1, size=n)
    centers = rng.normal(size=(k + 1, d)) * signal
    X = (rng.normal(size=(n, d)) + centers[y]).astype(np.float32)
    groups = np.repeat(np.arange(n_texts), per_text)
    layers = rng.integers(3, 8, size=n)
    available = pd.DataFrame(columns=["layer", "task", "count"])
    return TaskDataset(X, y, groups, layers, np.zeros(n, np.int64), np.arange(n), k, available, {})


@pytest.mark.parametrize("k", [2, 4])
def test_probe_predicts_like_its_sklearn_pipeline(k):
    data = synthetic(k=k)
    probe = TaskProbe().fit(data.X, data.y)
    pipeline = probe.pipeline_
    np.testing.assert_array_equal(probe.predict(data.X), pipeline.predict(data.X))
    np.testing.assert_allclose(
        probe.predict_proba(data.X), pipeline.predict_proba(data.X), atol=1e-6
    )
    assert probe.score(data) == pytest.approx(pipeline.score(data.X, data.y))
    assert probe.score(data) > 0.8
    np.testing.assert_array_equal(probe.classes_, np.arange(1, k + 1))


def test_probe_refuses_too_few_examples_and_one_class():
    X = np.random.default_rng(0).normal(size=(13, 4))
    y = np.array([1] * 6 + [2] * 5 + [3] * 2)
    with pytest.raises(ValueError, match=r"too few examples per class \(task 3: 2"):
        TaskProbe().fit(X, y)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        TaskProbe().fit(X[:6], y[:6])
    with pytest.raises(ValueError, match="not fitted"):
        TaskProbe().predict(X)


def test_probe_save_load_round_trip_and_errors(tiny6, texts, tmp_path):
    scan = fake_scan(tiny6, texts)
    data = task_dataset(tiny6, scan, texts, n_tasks=3, progress=False)
    probe = TaskProbe(C=0.5).fit(data)
    path = probe.save(tmp_path / "probe")
    assert path.name == "probe.safetensors"
    loaded = load_probe(path, tiny6)
    np.testing.assert_array_equal(loaded.predict(data.X), probe.predict(data.X))
    np.testing.assert_array_equal(loaded.predict_proba(data.X), probe.predict_proba(data.X))
    assert loaded.C == 0.5 and loaded.layers == probe.layers == data.layer_set
    assert loaded.metadata_["layers"] == list(range(L_TINY))
    assert loaded.metadata_["k"] == 3
    assert loaded.metadata_["unembedding_fingerprint"] == hooked.unembedding_fingerprint(tiny6)
    # the same probe, the same bytes (the safetensors library orders metadata at random), and
    # the library reads the file: arrays, dtypes and metadata
    from safetensors import safe_open

    again = [probe.save(tmp_path / f"again{i}").read_bytes() for i in range(4)]
    assert all(raw == path.read_bytes() for raw in again)
    with safe_open(str(path), "numpy") as f:
        assert f.metadata()["format"] == "beyond-top1-task-probe"
        for name in ("coef_", "intercept_", "classes_", "mean_", "scale_"):
            np.testing.assert_array_equal(f.get_tensor(name), getattr(probe, name))
            assert f.get_tensor(name).dtype == np.asarray(getattr(probe, name)).dtype
    # another model
    with pytest.raises(ProbeFileError, match="fit a probe for this model"):
        load_probe(path, make_tiny_model(n_layers=L_TINY, seed=5))
    # corrupt: a flipped byte in the weights, a truncated file, not a probe at all
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ProbeFileError, match="checksum"):
        load_probe(tmp_path / "flipped.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:50])
    with pytest.raises(ProbeFileError, match="corrupt"):
        load_probe(tmp_path / "cut.safetensors")
    with pytest.raises(ProbeFileError, match="no probe file"):
        load_probe(tmp_path / "missing.safetensors")
    # a probe fitted on plain arrays does not know its model
    with pytest.raises(ValueError, match="TaskDataset"):
        TaskProbe().fit(data.X, data.y).save(tmp_path / "bare")


# ---------------------------------------------------------------------------------------------
# Cross-validation
# ---------------------------------------------------------------------------------------------


def test_group_kfold_never_splits_a_text():
    """Labels and features that identify the *text* (not the task): a probe that saw a text's
    rows in training would recognise its other rows. Grouped by text it stays at chance; split
    by row (as a check that the test can fail) it does not."""
    from sklearn.model_selection import KFold, cross_val_score

    rng = np.random.default_rng(1)
    n_texts, per_text, d = 60, 10, 40
    text_label = rng.integers(1, 4, size=n_texts)
    text_vector = rng.normal(size=(n_texts, d)) * 3
    groups = np.repeat(np.arange(n_texts), per_text)
    X = (text_vector[groups] + rng.normal(size=(len(groups), d))).astype(np.float32)
    y = text_label[groups]
    data = TaskDataset(
        X, y, groups, np.full(len(y), 5), np.zeros(len(y), np.int64), np.arange(len(y)), 3,
        pd.DataFrame(), {},
    )  # fmt: skip
    cv = cross_validate_task_probe(data, n_splits=5, seed=0)
    assert (cv.folds["texts_on_both_sides"] == 0).all()
    assert cv.folds["n_test"].sum() == len(y) and len(cv.predictions) == len(y)
    assert cv.summary()["balanced_accuracy_mean"] < 0.55
    leaky = cross_val_score(TaskProbe(), X, y, cv=KFold(5, shuffle=True, random_state=0))
    assert leaky.mean() > 0.7


def test_cross_validation_beats_shuffled_baseline_and_reports_everything():
    data = synthetic(k=3, signal=1.0)
    cv = cross_validate_task_probe(data, n_splits=4, seed=3)
    summary = cv.summary()
    assert summary["balanced_accuracy_mean"] > 0.8
    assert abs(summary["shuffled_balanced_accuracy_mean"] - 1 / 3) < 0.15
    assert summary["margin_mean"] == pytest.approx(
        summary["balanced_accuracy_mean"] - summary["shuffled_balanced_accuracy_mean"]
    )
    folds = cv.folds["balanced_accuracy"]
    assert summary["balanced_accuracy_se"] == pytest.approx(folds.std(ddof=1) / 2)
    assert cv.per_class["task"].tolist() == [1, 2, 3]
    assert (cv.per_class["auc_mean"] > 0.9).all()
    assert sorted(cv.per_layer["layer"]) == sorted(np.unique(data.layers).tolist())
    assert cv.per_layer["n"].sum() == len(data)
    again = cross_validate_task_probe(data, n_splits=4, seed=3)
    pd.testing.assert_frame_equal(cv.folds, again.folds)
    with pytest.raises(ValueError, match="cannot be split"):
        cross_validate_task_probe(data.subset(np.flatnonzero(data.groups < 3)), n_splits=4)
