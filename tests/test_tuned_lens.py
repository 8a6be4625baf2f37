"""Tuned lens: exact at the last layer, affine init from another lens, training lowers KL."""

from __future__ import annotations

import pytest
import torch

import beyond_top1 as bt
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.tuned import TunedLens, train_tuned_lens
from beyond_top1.prompt import prompt_residuals


def _fit(model, texts, **kwargs):
    """``TunedLens.fit`` with its history, as the tests read both."""
    lens = TunedLens.fit(model, texts, **kwargs)
    return lens, lens.training_history


TEXTS = [
    "The river flows through the old town and into the sea.",
    "Paris is the capital and largest city of France.",
    "A computer program is a sequence of instructions for a computer.",
    "The cat sat on the mat while the dog slept by the fire.",
    "Mathematics is the study of numbers, shapes and patterns.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "Music is the arrangement of sound to create some combination of form.",
    "The library opens at nine and closes at five every weekday.",
    "Rain fell all night, and by morning the streets were flooded.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The old bridge was built from stone more than two centuries ago.",
    "Chess is a board game for two players played on a checkered board.",
]


class FixedAffineLens(Lens):
    """A hand-made affine lens: ``h @ M_l + c_l``."""

    kind = "fixed"

    def __init__(self, model, seed=0):
        super().__init__(model)
        g = torch.Generator().manual_seed(seed)
        d = self.d_model
        self.maps = torch.eye(d) + 0.1 * torch.randn(self.n_layers, d, d, generator=g)
        self.offsets = torch.randn(self.n_layers, d, generator=g)

    def transform(self, resid, layer):
        if layer == self.n_layers - 1:
            return resid
        return resid @ self.maps[layer] + self.offsets[layer]


def test_zero_init_tuned_lens_is_the_logit_lens(tiny_model):
    _, resid = prompt_residuals(tiny_model, TEXTS[0])
    tuned, logit = TunedLens(tiny_model), bt.LogitLens(tiny_model)
    for layer in range(tiny_model.cfg.n_layers):
        torch.testing.assert_close(tuned(resid[:, layer], layer), logit(resid[:, layer], layer))


def test_tuned_lens_is_exact_at_the_last_layer(tiny_model):
    ids, resid = prompt_residuals(tiny_model, TEXTS[1])
    tuned = TunedLens.from_lens(tiny_model, FixedAffineLens(tiny_model))
    with torch.no_grad():
        expected = tiny_model(torch.tensor([ids]))[0].log_softmax(-1)
        got = tuned(resid[:, -1], tiny_model.cfg.n_layers - 1).log_softmax(-1)
    assert (got - expected).abs().max() < 1e-4


def test_from_lens_reproduces_an_affine_lens(tiny_model):
    source = FixedAffineLens(tiny_model)
    tuned = TunedLens.from_lens(tiny_model, source)
    h = torch.randn(5, tiny_model.cfg.d_model)
    for layer in range(tiny_model.cfg.n_layers):
        torch.testing.assert_close(
            tuned.transform(h, layer), source.transform(h, layer), rtol=1e-4, atol=1e-4
        )


def test_training_lowers_heldout_kl_and_is_seeded(tiny_model):
    kwargs = dict(init="zero", max_steps=16, batch_size=4, eval_every=4, lr=1e-2)
    kwargs.update(n_heldout_texts=3, max_len=32, tokens_per_layer=64, progress=False)
    kwargs.update(score_first=True)  # the tokens this test was calibrated on (position 0 too)
    lens, history = _fit(tiny_model, TEXTS, **kwargs)
    start = history[history.step == 0].set_index("layer").heldout_kl
    best = torch.tensor(lens.training_settings["heldout_kl"])
    assert (best < 0.95 * torch.tensor(start.values)).all()  # every layer improves by > 5%
    again, _ = _fit(tiny_model, TEXTS, **kwargs)
    torch.testing.assert_close(lens.weight, again.weight)
    assert not lens.training and not lens.weight.requires_grad


def test_training_errors(tiny_model):
    with pytest.raises(ValueError, match="hold some out"):
        _fit(tiny_model, TEXTS[:2], progress=False)
    with pytest.raises(ValueError, match="init must be"):
        _fit(tiny_model, TEXTS, init="random", progress=False)


def test_linear_init_starts_from_the_least_squares_lens(tiny_model):
    linear = bt.LinearShortcutLens.fit(tiny_model, TEXTS, bias=True, max_len=32, progress=False)
    tuned = TunedLens.from_lens(tiny_model, linear)
    h = torch.randn(4, tiny_model.cfg.d_model)
    for layer in range(tiny_model.cfg.n_layers):
        torch.testing.assert_close(
            tuned.transform(h, layer), linear.transform(h, layer), rtol=1e-4, atol=1e-4
        )


def test_tuned_lens_save_load_round_trip(tiny_model, tmp_path):
    tuned = TunedLens.from_lens(tiny_model, FixedAffineLens(tiny_model))
    tuned.training_settings = {"steps": 3, "lr": 1e-3}
    tuned.save(tmp_path / "tuned")
    loaded = bt.load_lens(tmp_path / "tuned", tiny_model)
    assert isinstance(loaded, TunedLens) and loaded.training_settings["steps"] == 3
    h = torch.randn(3, tiny_model.cfg.d_model)
    for layer in range(tiny_model.cfg.n_layers):
        assert torch.equal(loaded(h, layer), tuned(h, layer))


def test_unembed_gradient_matches_autograd():
    from beyond_top1.lenses.tuned import _Unembed

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 40, generator=g, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    (x_ref @ w).sin().sum().backward()
    x_ours = x.clone().requires_grad_(True)
    _Unembed.apply(x_ours, w, w.T.contiguous()).sin().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad)


def test_unembed_backward_survives_the_bf16_32_row_gemm():
    """torch 2.13 CPU: ``[32, 49152] @ W.T``-view in bf16 raises SIGFPE; ours must not."""
    import subprocess
    import sys

    code = (
        "import torch; from beyond_top1.lenses.tuned import _Unembed\n"
        "w = torch.randn(576, 49152).bfloat16()\n"
        "x = torch.randn(32, 576).bfloat16().requires_grad_(True)\n"
        "_Unembed.apply(x, w, w.T.contiguous()).float().square().sum().backward()\n"
        "print(x.grad.shape)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_matches_autograd(dtype):
    from beyond_top1.lenses.tuned import _FusedKL, _kl, _Target

    g = torch.Generator().manual_seed(0)
    log_p = (3 * torch.randn(6, 50, generator=g)).log_softmax(-1)
    z = (3 * torch.randn(6, 50, generator=g)).to(dtype)
    target = _Target(log_p)
    z_ref = z.float().clone().requires_grad_(True)
    _kl(log_p, z_ref).backward()
    z_fused = z.clone().requires_grad_(True)
    loss = _FusedKL.apply(z_fused, target.p, target.mass, target.neg_entropy)
    loss.backward()
    assert z_fused.grad.dtype == dtype
    torch.testing.assert_close(loss, _kl(log_p, z.float()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_fused.grad.float(), z_ref.grad, rtol=1e-2, atol=1e-5)


def test_training_leaves_the_model_untouched_and_obeys_the_time_limit(tiny_model):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    kwargs = dict(init="zero", batch_size=4, n_heldout_texts=3, max_len=32, progress=False)
    lens, history = _fit(tiny_model, TEXTS, max_steps=2, eval_every=1, **kwargs)
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    assert list(history.step.unique()) == [0, 1, 2] and lens.training_settings["steps"] == 2
    assert {"seconds", "wall_seconds", "cpu_seconds"} <= set(history.columns)
    # A limit already spent at the first step: no step is taken, the lens is its init.
    lens, history = _fit(tiny_model, TEXTS, time_limit_s=0.0, clock="cpu", **kwargs)
    assert lens.training_settings["steps"] == 0 and list(history.step.unique()) == [0]
    assert torch.equal(lens.weight, torch.zeros_like(lens.weight))
    with pytest.raises(ValueError, match="clock must be"):
        _fit(tiny_model, TEXTS, clock="gpu", **kwargs)


def test_training_a_subset_of_layers_leaves_the_others_at_init(tiny_model):
    kwargs = dict(init="zero", max_steps=3, batch_size=4, eval_every=1, lr=1e-2, max_len=32)
    lens, history = _fit(tiny_model, TEXTS, layers=[1], n_heldout_texts=3, progress=False, **kwargs)
    assert set(history.layer) == {1} and lens.training_settings["trained_layers"] == [1]
    assert torch.equal(lens.weight[0], torch.zeros_like(lens.weight[0]))
    assert lens.weight[1].abs().sum() > 0
    with pytest.raises(ValueError, match="subset of the translated layers"):
        _fit(tiny_model, TEXTS, layers=[2], progress=False)


def test_the_deprecated_train_tuned_lens_warns_and_gives_the_same_lens(tiny_model):
    kwargs = dict(init="zero", max_steps=2, batch_size=4, eval_every=1, n_heldout_texts=3)
    kwargs.update(max_len=16, tokens_per_layer=16, progress=False)
    with pytest.warns(DeprecationWarning, match="TunedLens.fit"):
        old, history = train_tuned_lens(tiny_model, TEXTS, **kwargs)
    new = TunedLens.fit(tiny_model, TEXTS, **kwargs)
    assert torch.equal(old.weight, new.weight) and torch.equal(old.bias, new.bias)
    assert history is old.training_history
    same = ["step", "tokens", "layer", "heldout_kl"]  # (the timing columns differ)
    assert history[same].equals(new.training_history[same])
