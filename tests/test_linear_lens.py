"""Least-squares accumulator, linear-shortcut lens, and lens folders (save, load, errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

import beyond_top1 as bt
from beyond_top1 import hooked
from beyond_top1.activations import stream_residuals
from beyond_top1.lenses import LENS_KINDS, LensFileError, LinearShortcutLens, load_lens, save_lens
from beyond_top1.lenses.least_squares import LeastSquaresAccumulator
from beyond_top1.lenses.linear import fit_linear_maps
from beyond_top1.prompt import prompt_residuals

TEXTS = [
    "The river flows through the old town and into the sea.",
    "Paris is the capital and largest city of France.",
    "A computer program is a sequence of instructions for a computer.",
    "The cat sat on the mat while the dog slept by the fire.",
    "Mathematics is the study of numbers, shapes and patterns.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "Music is the arrangement of sound to create some combination of form.",
    "The library opens at nine and closes at five every weekday.",
]
FIT = dict(batch_size=4, max_len=32, progress=False)


@pytest.fixture(scope="module")
def linear_lens(tiny_model):
    return LinearShortcutLens.fit(tiny_model, TEXTS, **FIT)


def _problem(n=120, d_in=6, d_out=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) + rng.normal(size=d_in)
    y = x @ rng.normal(size=(d_in, d_out)) + 0.3 * rng.normal(size=(n, d_out)) + 2.0
    return x, y


def _feed(acc, x, y, chunks=(50, 1, 39, 30)):
    start = 0
    for size in chunks:
        acc.update(
            torch.from_numpy(x[start : start + size]), torch.from_numpy(y[start : start + size])
        )
        start += size
    assert start == len(x) and acc.n_tokens == len(x)


# ---------------------------------------------------------------------------------------------
# LeastSquaresAccumulator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_accumulator_matches_numpy_lstsq(bias):
    x, y = _problem()
    acc = LeastSquaresAccumulator(6, 4, bias=bias)
    _feed(acc, x, y)
    weight, offset = acc.solve(ridge=0.0)
    design = np.hstack([x, np.ones((len(x), 1))]) if bias else x
    expected = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(weight.numpy(), expected[:6], atol=1e-10)
    if bias:
        np.testing.assert_allclose(offset.numpy(), expected[6], atol=1e-10)
    else:
        assert offset is None


def test_ridge_is_relative_and_leaves_the_bias_alone():
    x, y = _problem()
    ridge = 0.05
    acc = LeastSquaresAccumulator(6, 4, bias=True)
    _feed(acc, x, y)
    weight, offset = acc.solve(ridge)
    lam = ridge * np.mean(np.sum(x**2, axis=0))
    # ridge == least squares on rows augmented with sqrt(λ)·I (zero in the intercept column)
    design = np.vstack(
        [
            np.hstack([x, np.ones((len(x), 1))]),
            np.hstack([np.sqrt(lam) * np.eye(6), np.zeros((6, 1))]),
        ]
    )
    expected = np.linalg.lstsq(design, np.vstack([y, np.zeros((6, 4))]), rcond=None)[0]
    np.testing.assert_allclose(weight.numpy(), expected[:6], atol=1e-10)
    np.testing.assert_allclose(offset.numpy(), expected[6], atol=1e-10)
    # relative: scaling the inputs scales the solution inversely, whatever the ridge
    scaled = LeastSquaresAccumulator(6, 4, bias=True)
    _feed(scaled, 1000 * x, y)
    np.testing.assert_allclose(1000 * scaled.solve(ridge)[0].numpy(), weight.numpy(), atol=1e-9)


def test_batched_accumulator_matches_separate_maps():
    x, y = _problem(d_in=5, d_out=5)
    xs = np.stack([x, x**2, np.sin(x)], axis=1)  # [n, 3 maps, 5]
    ys = np.stack([y, -y, y[:, ::-1]], axis=1)
    for targets in (y, ys):  # one shared target, then one target per map
        acc = LeastSquaresAccumulator(5, 5, bias=True, n_maps=3)
        _feed(acc, xs, targets)
        weight, offset = acc.solve(1e-3)
        assert weight.shape == (3, 5, 5) and offset.shape == (3, 5)
        for i in range(3):
            single = LeastSquaresAccumulator(5, 5, bias=True)
            _feed(single, xs[:, i], targets if targets.ndim == 2 else targets[:, i])
            w_i, b_i = single.solve(1e-3)
            torch.testing.assert_close(weight[i], w_i)
            torch.testing.assert_close(offset[i], b_i)


def test_accumulator_errors():
    acc = LeastSquaresAccumulator(3, 2, bias=False)
    with pytest.raises(ValueError, match="no rows"):
        acc.solve()
    with pytest.raises(ValueError, match="X must have shape"):
        acc.update(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same rows"):
        acc.update(torch.zeros(4, 3), torch.zeros(5, 2))
    acc.update(torch.ones(4, 3), torch.zeros(4, 2))  # rank 1
    with pytest.raises(ValueError, match="singular.*ridge > 0"):
        acc.solve(ridge=0.0)
    assert torch.isfinite(acc.solve(ridge=1e-4)[0]).all()


# ---------------------------------------------------------------------------------------------
# LinearShortcutLens
# ---------------------------------------------------------------------------------------------


def test_last_layer_reproduces_model_log_probs(tiny_model, linear_lens):
    ids, resid = prompt_residuals(tiny_model, "The quick brown fox jumps over the lazy dog")
    last = tiny_model.cfg.n_layers - 1
    with torch.inference_mode():
        expected = tiny_model(torch.tensor([ids]))[0].log_softmax(-1)
        got = linear_lens(resid[:, last], last).log_softmax(-1)
    assert (got - expected).abs().max().item() < 1e-4


def test_fitted_maps_beat_the_identity_on_training_data(tiny_model, linear_lens):
    L = tiny_model.cfg.n_layers
    errors = torch.zeros(L - 1, 2, dtype=torch.float64)
    for batch in stream_residuals(tiny_model, TEXTS, **FIT):
        target = batch.at(L - 1)
        for layer in range(L - 1):
            h = batch.at(layer)
            errors[layer, 0] += (linear_lens.transform(h, layer) - target).pow(2).sum()
            errors[layer, 1] += (h - target).pow(2).sum()
    assert (errors[:, 0] < 0.9 * errors[:, 1]).all(), errors


def test_fit_records_settings_and_matches_a_single_pair_fit(tiny_model, linear_lens):
    settings = linear_lens.fit_settings
    assert settings["n_texts"] == len(TEXTS) and settings["ridge"] == 1e-4
    assert settings["n_tokens"] == sum(len(b) for b in stream_residuals(tiny_model, TEXTS, **FIT))
    assert linear_lens.layers == (0, 1, 2) and not linear_lens.use_bias
    assert torch.count_nonzero(linear_lens.bias) == 0
    maps = fit_linear_maps(tiny_model, TEXTS, [1], 2, **FIT)
    assert maps.weight.shape == (1, 32, 32) and maps.bias is None
    torch.testing.assert_close(maps.weight[0].float(), linear_lens.weight[1])


def test_embedding_and_bias_options(tiny_model):
    lens = LinearShortcutLens.fit(tiny_model, TEXTS[:4], bias=True, include_embedding=True, **FIT)
    assert lens.layers == (-1, 0, 1, 2)
    assert torch.count_nonzero(lens.bias) > 0
    h = torch.randn(3, 32)
    torch.testing.assert_close(lens.transform(h, -1), h @ lens.weight[0] + lens.bias[0])
    with pytest.raises(ValueError, match="no linear map for layer -1"):
        LinearShortcutLens(tiny_model).transform(h, -1)


# ---------------------------------------------------------------------------------------------
# Lens folders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "logit"])
def test_save_load_round_trip(tiny_model, linear_lens, tmp_path, kind):
    lens = linear_lens if kind == "linear" else bt.LogitLens(tiny_model)
    path = lens.save(tmp_path / "lens")
    config = json.loads((path / "config.json").read_text())
    assert config["kind"] == kind and config["model_name"] == "tiny-rms-3l"
    assert config["unembedding_fingerprint"] == hooked.unembedding_fingerprint(tiny_model)
    assert config["beyond_top1_version"] == bt.__version__
    loaded = load_lens(path, tiny_model)
    assert type(loaded) is type(lens) and loaded.config() == lens.config()
    _, resid = prompt_residuals(tiny_model, "Lenses are saved as folders")
    with torch.inference_mode():
        for layer in lens.layers:
            assert torch.equal(loaded(resid[:, layer], layer), lens(resid[:, layer], layer))
    save_lens(lens, path)  # overwriting a lens folder is allowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]


def test_loading_onto_another_model_names_both(tiny_model, tiny_ln_model, linear_lens, tmp_path):
    path = linear_lens.save(tmp_path / "lens")
    with pytest.raises(
        LensFileError, match="saved for model 'tiny-rms-3l'.*given model is 'tiny-ln-3l'"
    ):
        load_lens(path, tiny_ln_model)
    other = make_tiny_model(n_layers=2, d_vocab=100)
    with pytest.raises(LensFileError, match="n_layers=3.*n_layers=2"):
        load_lens(path, other)


def test_corrupt_folders_raise_helpful_errors(tiny_model, linear_lens, tmp_path):
    with pytest.raises(LensFileError, match="no lens folder at .*fit-lens"):
        load_lens(tmp_path / "missing", tiny_model)

    path = linear_lens.save(tmp_path / "lens")
    config = path / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(LensFileError, match="corrupt or truncated.*not valid JSON.*Re-run"):
        load_lens(path, tiny_model)
    config.write_text(json.dumps({"kind": "linear"}))
    with pytest.raises(LensFileError, match="lacks the keys"):
        load_lens(path, tiny_model)
    config.write_text(text.replace('"kind": "linear"', '"kind": "nonsense"'))
    with pytest.raises(LensFileError, match="unknown lens kind 'nonsense'"):
        load_lens(path, tiny_model)
    config.write_text(text)

    weights = path / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LensFileError, match="does not match the checksum.*truncated"):
        load_lens(path, tiny_model)
    weights.unlink()
    with pytest.raises(LensFileError, match="weights.safetensors is missing"):
        load_lens(path, tiny_model)
    config.unlink()
    with pytest.raises(LensFileError, match="config.json is missing"):
        load_lens(path, tiny_model)


def test_save_refuses_to_overwrite_other_folders(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LensFileError, match="not a lens folder"):
        bt.LogitLens(tiny_model).save(tmp_path)
    assert set(LENS_KINDS) >= {"logit", "linear"}
