"""Sub-module linear replacement (004 §6): hooks, fits and evaluation against slow references."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from beyond_top1 import hooked
from beyond_top1.data import tokenize, wiki_texts
from beyond_top1.hooks import (
    linear_replacement_hooks,
    replace_with_constant,
    submodule_replacement_hooks,
)
from beyond_top1.replacement import SubmoduleMaps, evaluate_replacements

TEXTS = wiki_texts(3, split="train")


def _single_token_texts(model, n: int) -> list[str]:
    """``n`` strings that are exactly one token each (so every sequence has length 1)."""
    tok = hooked.tokenizer(model)
    texts = []
    for token_id in range(400, 5000):
        text = tok.decode([token_id])
        if text.strip() and tok(text, add_special_tokens=False)["input_ids"] == [token_id]:
            texts.append(text)
        if len(texts) == n:
            return texts
    raise AssertionError("not enough single-token strings")


def _tokens(model, text: str, n: int) -> torch.Tensor:
    return torch.tensor([tokenize(model, text, max_len=n, truncate=True)])


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_ln_model"])
def test_hook_names_exist(fixture, request):
    model = request.getfixturevalue(fixture)
    hooked.check_submodule_layout(model)
    for layer in range(model.cfg.n_layers):
        for kind in hooked.SUBMODULE_KINDS:
            for name in hooked.submodule_hook_names(layer, kind):
                assert name in model.hook_dict, name


def test_run_from_layer_matches_full_run(tiny_model):
    tokens = _tokens(tiny_model, TEXTS[0], 40)
    names = [hooked.resid_pre_hook_name(l) for l in range(3)]
    logits, acts = hooked.run_with_activations(tiny_model, tokens, names, return_logits=True)
    for layer in range(3):
        out = hooked.run_from_layer(tiny_model, acts[names[layer]], layer)
        torch.testing.assert_close(out, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_ln_model"])
def test_exact_attention_map_reproduces_model(fixture, request):
    """On length-1 sequences attention is exactly affine in its input: the fitted map is exact,
    so the replaced model reproduces the unmodified one at every layer."""
    model = request.getfixturevalue(fixture)
    texts = _single_token_texts(model, 80)
    one_token = {"score_first": True, "progress": False}  # the only position is position 0
    maps = SubmoduleMaps.fit(
        model, texts[:64], kinds=("attn",), ridge=1e-10, batch_size=32, **one_token
    )
    frame = evaluate_replacements(
        model, maps, texts[64:], variants=("fit", "zero"), batch_size=16, **one_token
    )
    fit = frame[frame["variant"] == "fit"]
    assert (fit["n_tokens"] == 16).all()
    assert (fit["precision_at_1"] == 1.0).all()
    assert (fit["kl"] < 1e-6).all(), fit
    assert (fit["r2"] > 0.999999).all(), fit
    assert (frame[frame["variant"] == "zero"]["kl"] > 1e-4).all()  # the test can fail


def test_identity_and_zero_hooks_match_manual_references(tiny_ln_model):
    model, layer = tiny_ln_model, 1
    tokens = _tokens(model, TEXTS[1], 30)
    source, target = hooked.submodule_hook_names(layer, "attn")
    _, clean = hooked.run_with_activations(model, tokens, [source])
    # identity: attention's output := its (normalised) input, from the clean cache
    reference = model.run_with_hooks(tokens, fwd_hooks=[(target, lambda a, hook: clean[source])])
    ours = model.run_with_hooks(tokens, fwd_hooks=linear_replacement_hooks(source, target))
    torch.testing.assert_close(ours, reference)
    # zero: the same as zeroing W_O and b_O of that block, in a second copy of the model
    ablated = make_tiny_model(normalization="LN", seed=1)
    with torch.no_grad():
        if hooked.is_bridge(ablated):  # the bridge runs the Hugging Face module's weights
            projection = ablated.original_model.transformer.h[layer].attn.c_proj
            projection.weight.zero_()
            projection.bias.zero_()
        else:
            ablated.blocks[layer].attn.W_O.zero_()
            ablated.blocks[layer].attn.b_O.zero_()
    assert not torch.allclose(model(tokens), ablated(tokens), atol=1e-3)  # the test can fail
    ours = model.run_with_hooks(tokens, fwd_hooks=[(target, replace_with_constant(0.0))])
    torch.testing.assert_close(ours, ablated(tokens), atol=1e-5, rtol=1e-5)


def test_submodule_replacement_with_true_map_of_a_linear_stage(tiny_ln_model):
    """``hook_resid_mid -> hook_resid_mid`` with W = I reproduces the run; a scaled W does not."""
    tokens = _tokens(tiny_ln_model, TEXTS[0], 20)
    clean = tiny_ln_model(tokens)
    d = tiny_ln_model.cfg.d_model
    name = "blocks.1.hook_resid_mid"
    same = tiny_ln_model.run_with_hooks(
        tokens, fwd_hooks=linear_replacement_hooks(name, name, torch.eye(d))
    )
    torch.testing.assert_close(same, clean)
    scaled = linear_replacement_hooks(name, name, 2 * torch.eye(d), torch.ones(d))
    assert not torch.allclose(tiny_ln_model.run_with_hooks(tokens, fwd_hooks=scaled), clean)
    hooks = submodule_replacement_hooks(0, "norm")
    assert [n for n, _ in hooks] == ["blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized"]


def test_output_before_input_raises(tiny_model):
    tokens = _tokens(tiny_model, TEXTS[0], 8)
    hooks = linear_replacement_hooks("blocks.1.hook_resid_pre", "blocks.0.hook_attn_out")
    with pytest.raises(RuntimeError, match="fired before"):
        tiny_model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_fit_matches_lstsq_reference(tiny_model):
    """Streaming normal equations over padded batches == lstsq on per-text activations."""
    kinds = ("attn", "mlp", "norm")
    maps = SubmoduleMaps.fit(
        tiny_model, TEXTS, kinds=kinds, ridge=0.0, batch_size=2, max_len=48, progress=False
    )
    xs = {k: [[] for _ in range(3)] for k in kinds}
    ys = {k: [[] for _ in range(3)] for k in kinds}
    for text in TEXTS:
        tokens = torch.tensor([tokenize(tiny_model, text, max_len=48, truncate=True)])
        _, cache = tiny_model.run_with_cache(tokens)
        for kind in kinds:
            for layer in range(3):
                source, target = hooked.submodule_hook_names(layer, kind)
                xs[kind][layer].append(cache[source][0, 1:].double())  # position 0 left out
                ys[kind][layer].append(cache[target][0, 1:].double())
    assert maps.n_tokens == sum(len(x) for x in xs["attn"][0])
    for kind in kinds:
        for layer in range(3):
            x, y = torch.cat(xs[kind][layer]), torch.cat(ys[kind][layer])
            design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            solution = torch.linalg.lstsq(design, y).solution
            torch.testing.assert_close(
                maps.weight[kind][layer], solution[:-1], atol=1e-6, rtol=1e-5
            )
            torch.testing.assert_close(maps.bias[kind][layer], solution[-1], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(maps.mean_output[kind][layer], y.mean(0))


def test_evaluation_matches_full_runs(tiny_ln_model):
    """Batched, start-at-layer evaluation == one full hooked run per text, scored by hand."""
    model = tiny_ln_model
    maps = SubmoduleMaps.fit(model, wiki_texts(6, split="train"), max_len=32, progress=False)
    texts = wiki_texts(2, split="val")
    variants = ("fit", "mean")
    frame = evaluate_replacements(
        model,
        maps,
        texts,
        layers=(1,),
        variants=variants,
        batch_size=2,
        max_len=24,
        progress=False,
    ).set_index(["kind", "variant"])
    for kind in ("attn", "mlp", "norm"):
        for variant in variants:
            agree, kls, n = 0, [], 0
            for text in texts:
                tokens = torch.tensor([tokenize(model, text, max_len=24, truncate=True)])
                with torch.no_grad():
                    p = model(tokens)[0].log_softmax(-1)
                    q = model.run_with_hooks(tokens, fwd_hooks=maps.hooks(1, kind, variant))
                p, q = p[1:], q[0, 1:].log_softmax(-1)  # position 0 is not scored
                agree += int((p.argmax(-1) == q.argmax(-1)).sum())
                kls.append((p.exp() * (p - q)).sum(-1))
                n += tokens.shape[1] - 1
            row = frame.loc[(kind, variant)]
            assert row["n_tokens"] == n
            assert row["precision_at_1"] == pytest.approx(agree / n)
            assert row["kl"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4, abs=1e-6)


def test_layout_check_rejects_split_qkv_models():
    model = make_tiny_model(n_layers=1, d_vocab=50)
    model.cfg.use_split_qkv_input = True
    with pytest.raises(ValueError, match="head dimension"):
        hooked.check_submodule_layout(model)
    with pytest.raises(ValueError, match="kind must be one of"):
        hooked.submodule_hook_names(0, "ffn")
