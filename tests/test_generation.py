"""The real early-exit decoder: full-greedy equivalence, the skipped layers' key/value fill,
and mixed exits against a slow hook-based reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from beyond_top1 import hooked
from beyond_top1.bridge import transformer_lens_major
from beyond_top1.early_exit import (
    FixedLayerExit,
    LayerState,
    MarginExit,
    NeverExit,
    benchmark_early_exit,
    generate_early_exit,
    greedy_reference,
)
from beyond_top1.lenses import LogitLens

PROMPT = [3, 17, 42, 8, 25, 11]


TL3 = transformer_lens_major() < 4
pytestmark = pytest.mark.skipif(
    not TL3, reason="block-by-block decoding needs HookedTransformer (TransformerLens 3.9)"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-1 decoding is many tiny ops: one thread is faster (and far faster on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_gqa_model(seed: int = 2):
    """A 3-layer RMS/rotary model with grouped-query attention (4 query, 2 key/value heads)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from beyond_top1.models import _quiet

    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=64,
        n_ctx=64,
        d_vocab=64,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        final_rms=True,
        default_prepend_bos=False,
        seed=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet():
            model = HookedTransformer(cfg, move_to_device=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("W_O", "W_out")):
                param.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module", params=["rms", "ln", "gqa"])
def small_model(request):
    if request.param == "rms":
        return make_tiny_model(d_vocab=64, seed=5)
    if request.param == "ln":
        return make_tiny_model(d_vocab=64, normalization="LN", seed=6)
    return make_gqa_model()


def test_always_false_criterion_reproduces_full_greedy_decoding(small_model):
    reference = greedy_reference(small_model, PROMPT, 16)
    calls = []

    def never(state: LayerState) -> bool:
        calls.append(state.layer)
        return False

    generation = generate_early_exit(small_model, PROMPT, never, max_new_tokens=16)
    assert generation.token_ids == reference
    L = hooked.n_layers(small_model)
    assert generation.exit_layers == [L - 1] * 16
    assert sorted(set(calls)) == list(range(L - 1))  # checked after every block but the last
    assert generate_early_exit(small_model, PROMPT, None, max_new_tokens=16).token_ids == reference


@pytest.mark.parametrize("fast", [True, False])
def test_skipped_layer_kv_fill_equals_what_the_block_computes(small_model, fast):
    """Keys/values computed from a block's input residual equal TransformerLens' own."""
    tokens = torch.tensor([PROMPT])
    L = hooked.n_layers(small_model)
    with torch.inference_mode():
        cache = hooked.new_kv_cache(small_model)
        resid, mask = hooked.embed_step(small_model, tokens, cache)
        inputs = []
        for layer in range(L):
            inputs.append(resid)
            resid = hooked.run_block(small_model, layer, resid, cache, mask)
        fresh = hooked.new_kv_cache(small_model)
        hooked.embed_step(small_model, tokens, fresh)  # extends the mask like a real step
        for layer in range(L):
            hooked.append_kv_from_resid(small_model, layer, inputs[layer], fresh, mask, fast=fast)
            torch.testing.assert_close(fresh[layer].past_keys, cache[layer].past_keys)
            torch.testing.assert_close(fresh[layer].past_values, cache[layer].past_values)


def copy_state_reference(model, prompt, exit_layer_of, lens, max_new_tokens):
    """Slow reference for the CALM copy strategy: every step reruns the whole sequence, and for
    each position ``p`` that exited at ``e`` the residual entering blocks ``e+1..L-1`` is
    replaced by its ``resid_post`` at ``e`` (hooks). The new token is the lens' top-1 at the
    last position's exit layer (or the model's top-1 if it does not exit)."""
    L = hooked.n_layers(model)
    ids = list(prompt)
    first_eligible = len(prompt)  # the prompt and the first new token's pass run every layer
    out, exits = [], []
    for step in range(max_new_tokens):
        exits_by_pos = {p: exit_layer_of(p) for p in range(first_eligible, len(ids)) if step > 0}
        exits_by_pos = {p: e for p, e in exits_by_pos.items() if e is not None}
        stash = {}
        hooks = []
        for e in sorted(set(exits_by_pos.values())):

            def save(act, hook, e=e, stash=stash):
                stash[e] = act.clone()

            hooks.append((hooked.resid_hook_name(e), save))
        for j in range(1, L):

            def replace(act, hook, j=j, stash=stash, exits_by_pos=exits_by_pos):
                act = act.clone()
                for p, e in exits_by_pos.items():
                    if e < j:
                        act[:, p] = stash[e][:, p]
                return act

            hooks.append((f"blocks.{j}.hook_resid_pre", replace))
        tokens = torch.tensor([ids])
        with torch.inference_mode():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        last = len(ids) - 1
        e = exits_by_pos.get(last)
        if e is None:
            token = int(logits[0, -1].argmax())
            exits.append(L - 1)
        else:
            with torch.inference_mode():
                token = int(lens(stash[e][0, last], e).argmax())
            exits.append(e)
        out.append(token)
        ids.append(token)
    return out, exits


def test_mixed_exits_match_the_copy_state_reference(small_model):
    L = hooked.n_layers(small_model)
    assert L == 3

    def exit_layer_of(position: int):
        return {0: 0, 1: 1, 2: None}[position % 3]

    def criterion(state: LayerState) -> bool:
        return exit_layer_of(state.position) == state.layer

    lens = LogitLens(small_model)
    generation = generate_early_exit(small_model, PROMPT, criterion, lens=lens, max_new_tokens=12)
    tokens, exits = copy_state_reference(small_model, PROMPT, exit_layer_of, lens, 12)
    assert generation.exit_layers == exits
    assert generation.token_ids == tokens
    assert set(exits[1:]) == {0, 1, 2}
    # The fill matters: decoding without it (or with exits everywhere) gives other tokens.
    full = greedy_reference(small_model, PROMPT, 12)
    assert full != tokens


def test_layer_state_margin_and_fixed_exit(small_model):
    lens = LogitLens(small_model)
    L = hooked.n_layers(small_model)
    with torch.inference_mode():
        resid = torch.randn(hooked.d_model(small_model))
        state = LayerState(0, 4, resid, resid, lens)
        probs = lens(resid, 0).softmax(-1).topk(2).values
        assert state.margin() == pytest.approx(float(probs[0] - probs[1]), abs=1e-6)
        assert MarginExit(float(probs[0] - probs[1]) - 1e-4)(state)
        assert not MarginExit(float(probs[0] - probs[1]) + 1e-4)(state)
        assert not MarginExit(0.0, min_layer=1)(state)
    generation = generate_early_exit(small_model, PROMPT, FixedLayerExit(1), max_new_tokens=5)
    assert generation.exit_layers == [L - 1, 1, 1, 1, 1]
    assert generation.mean_layers == 2.0


def test_benchmark_with_a_never_firing_criterion_agrees_fully(tiny_model):
    bench = benchmark_early_exit(
        tiny_model,
        ["The cat sat on", "Paris is the"],
        {"never": NeverExit(), "layer0": FixedLayerExit(0)},
        max_new_tokens=6,
    )
    summary = bench.summary().set_index("criterion")
    never = summary.loc["never"]
    assert never.agreement == 1.0 and never.exact_sequences == 1.0
    assert never.same_prefix_agreement == 1.0
    assert never.new_tokens == 12 and never.prompts == 2
    assert never.mean_layers == hooked.n_layers(tiny_model)
    assert summary.loc["layer0"].mean_layers == 1.0
    assert summary.loc["layer0"].fraction_layers_saved == pytest.approx(2 / 3)
    assert len(bench.per_prompt) == 4 and "never" in repr(bench)
    # the speed-up is total full-decoding time over total early-exit time, per criterion
    # (not a mean of per-prompt ratios)
    times = bench.per_prompt.groupby("criterion")[["seconds_full", "seconds_early_exit"]].sum()
    ratio = times["seconds_full"] / times["seconds_early_exit"]
    np.testing.assert_allclose(summary["speedup"], ratio.loc[summary.index], rtol=1e-12)


def test_probe_exit_uses_the_probe_on_the_new_token(small_model):
    from beyond_top1.early_exit import ProbeExit

    class SaysSettled:
        def __init__(self):
            self.rows = []

        def predict(self, X):
            self.rows.append(X.shape)
            return [2] * len(X)

    probe = SaysSettled()
    generation = generate_early_exit(small_model, PROMPT, ProbeExit(probe), max_new_tokens=6)
    fixed = generate_early_exit(small_model, PROMPT, FixedLayerExit(0), max_new_tokens=6)
    assert generation.token_ids == fixed.token_ids
    assert generation.exit_layers == [hooked.n_layers(small_model) - 1] + [0] * 5
    assert probe.rows == [(1, hooked.d_model(small_model))] * 5
    with pytest.raises(ValueError, match="predict_proba"):
        generate_early_exit(small_model, PROMPT, ProbeExit(probe, theta=0.5), max_new_tokens=2)
