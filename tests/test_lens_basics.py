"""The logit lens: exact at the last layer, final norm recomputed per layer, prompt readout."""

from __future__ import annotations

import pytest
import torch

import beyond_top1 as bt
from beyond_top1 import hooked
from beyond_top1.prompt import prompt_residuals


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_ln_model", "smollm2"])
def test_logit_lens_reproduces_model_logits_at_last_layer(fixture, request):
    model = request.getfixturevalue(fixture)
    ids, resid = prompt_residuals(model, "The quick brown fox jumps over the lazy dog")
    lens = bt.LogitLens(model)
    with torch.inference_mode():
        expected = model(torch.tensor([ids]))[0].log_softmax(-1)
        got = lens(resid[:, -1], model.cfg.n_layers - 1).log_softmax(-1)
    assert (got - expected).abs().max().item() < 1e-4


def test_final_norm_uses_each_layers_own_scale(tiny_model):
    """Layer 0's logits use layer 0's RMS, not the final layer's (docs/conventions.md)."""
    ids, resid = prompt_residuals(tiny_model, "A short sentence about lenses")
    h0 = resid[:, 0]
    normed = h0 / (h0.pow(2).mean(-1, keepdim=True) + tiny_model.cfg.eps).sqrt()
    expected = normed * tiny_model.ln_final.w @ tiny_model.W_U + tiny_model.b_U
    with torch.inference_mode():
        got = bt.LogitLens(tiny_model)(h0, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lens_rejects_bad_layers(tiny_model):
    lens = bt.LogitLens(tiny_model)
    h = torch.zeros(2, tiny_model.cfg.d_model)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        lens(h, 3)
    assert lens(h, -1).shape == (2, hooked.d_vocab(tiny_model))


def test_lens_is_not_a_copy_of_the_model(tiny_model):
    lens = bt.LogitLens(tiny_model)
    assert list(lens.parameters()) == [] and lens.state_dict() == {}


def test_top_tokens_table_matches_full_sort(tiny_model):
    prompt = "Once upon a time"
    frame = bt.top_tokens(tiny_model, prompt, k=4)
    assert list(frame.columns) == ["layer", "rank", "token_id", "token", "prob"]
    assert len(frame) == tiny_model.cfg.n_layers * 4
    _, resid = prompt_residuals(tiny_model, prompt)
    for layer in range(tiny_model.cfg.n_layers):
        with torch.inference_mode():
            probs = bt.LogitLens(tiny_model)(resid[-1, layer], layer).softmax(-1)
        order = torch.argsort(probs, descending=True)[:4].tolist()
        rows = frame[frame.layer == layer].sort_values("rank")
        assert rows.token_id.tolist() == order
        assert rows.prob.tolist() == pytest.approx(probs[order].tolist(), rel=1e-5)


def test_top_tokens_errors(tiny_model):
    with pytest.raises(ValueError, match="k must be between 1"):
        bt.top_tokens(tiny_model, "Hello", k=10**6)
    with pytest.raises(ValueError, match="empty"):
        bt.top_tokens(tiny_model, "   ")
    with pytest.raises(ValueError, match="context"):
        bt.top_tokens(tiny_model, "word " * 200)  # tiny model's context is 64
    with pytest.raises(IndexError, match="position"):
        bt.top_tokens(tiny_model, "Hello there", position=50)
