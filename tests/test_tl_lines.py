"""What differs between the TransformerLens lines, and the toolkit's answer to each."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import beyond_top1 as bt
from beyond_top1 import hooked
from beyond_top1.bridge import transformer_lens_major

TL4 = transformer_lens_major() >= 4


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(d_vocab=64, seed=5)


def test_load_model_returns_the_lines_class(model):
    assert hooked.is_bridge(model) == TL4
    assert bt.load_model(model) is model  # a model passed in is returned as is


@pytest.mark.skipif(not TL4, reason="TransformerLens 4 only")
def test_early_exit_decoding_on_a_bridge_says_what_is_missing(model):
    from beyond_top1.early_exit.decoder import generate_early_exit

    with pytest.raises(NotImplementedError, match="TransformerLens key/value cache"):
        generate_early_exit(model, torch.tensor([1, 2, 3]), max_new_tokens=2)
    assert not hooked.supports_tl_kv_cache(model)


@pytest.mark.skipif(not TL4, reason="TransformerLens 4 only")
def test_a_bridge_outside_compatibility_mode_is_refused():
    from transformer_lens.model_bridge import TransformerBridge

    bare = make_tiny_model(d_vocab=64, seed=5)
    assert isinstance(bare, TransformerBridge)
    object.__setattr__(bare, "compatibility_mode", False)
    with pytest.raises(ValueError, match="enable_compatibility_mode"):
        bt.load_model(bare)


def test_record_keys_are_hooked_transformer_names(model):
    """The bridge hands hook functions ``blocks.{l}.hook_out``; stores use the registered name."""
    from beyond_top1.hooks import record

    store = {}
    names = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.hook_resid_mid")
    model.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[(n, record(store)) for n in names])
    assert sorted(store) == sorted(names)


def test_no_deprecation_warning_reaches_the_user():
    """Loading, scanning, hooking and fitting on either line: no DeprecationWarning shown."""
    import warnings

    from beyond_top1.hooks import record

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = bt.load_model("untrained:gpt2-small", seed=0)
        texts = ["The quick brown fox jumps over the lazy dog."]
        bt.scan(model, texts, k=2, progress=False)
        store = {}
        model.run_with_hooks(
            torch.tensor([[1, 2, 3]]), fwd_hooks=[("blocks.1.hook_resid_post", record(store))]
        )
        bt.LinearShortcutLens.fit(model, texts, progress=False)
    shown = [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)]
    assert not shown, [f"{w.filename}:{w.lineno}: {w.message}" for w in shown]
