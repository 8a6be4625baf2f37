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


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 saved with ``save_pretrained``, tokenizer included."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from beyond_top1.models import _quiet, smollm2_tokenizer

    tok = smollm2_tokenizer()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=len(tok))
    config.bos_token_id = config.eos_token_id = tok.eos_token_id
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_paths_that_are_not_model_folders_say_what_to_do(tmp_path):
    from beyond_top1.models import UnknownModelError

    with pytest.raises(UnknownModelError, match="does not exist"):
        bt.load_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UnknownModelError, match="is a file, not a folder"):
        bt.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(UnknownModelError, match="no config.json"):
        bt.load_model(tmp_path)


@pytest.mark.skipif(not TL4, reason="Hugging Face folders load on TransformerLens 4")
def test_folder_as_path_bos_override_and_missing_tokenizer(gpt2_folder, tmp_path):
    import shutil

    from beyond_top1.models import UnknownModelError

    model = bt.load_model(gpt2_folder)  # a pathlib.Path
    assert hooked.is_bridge(model) and hooked.prepends_bos(model)  # TransformerLens' default
    plain = bt.load_model(str(gpt2_folder), prepend_bos=False)
    assert not hooked.prepends_bos(plain)
    assert bt.tokenize(plain, "Hello")[0] != plain.tokenizer.bos_token_id
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_folder / name, bare / name)
    with pytest.raises(UnknownModelError, match="no tokenizer"):
        bt.load_model(bare)


@pytest.mark.skipif(not TL4, reason="device_map / n_devices are TransformerLens 4's")
def test_device_map_reaches_the_bridge_and_scans_the_same(gpt2_folder, monkeypatch):
    """``device_map`` goes to ``TransformerBridge.boot_transformers`` (and from there to
    Hugging Face's loader) instead of ``device``; a model placed by a map on this CPU scans to
    the same ids and log-probs as one loaded with ``device="cpu"``. (Placing over several GPUs
    is not tested here: no machine with several was available.)"""
    from transformer_lens.model_bridge import TransformerBridge

    from beyond_top1.models import UnknownModelError

    texts = ["Paris is the capital of France, and Rome is the capital of Italy."]
    plain = bt.scan(bt.load_model(gpt2_folder), texts, k=3, progress=False)
    boot, seen = TransformerBridge.boot_transformers, []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return boot(*args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy)
    placed = bt.load_model(gpt2_folder, device_map={"": "cpu"})
    assert seen[-1]["device_map"] == {"": "cpu"} and "device" not in seen[-1]
    mapped = bt.scan(placed, texts, k=3, progress=False)
    assert (mapped.top_ids == plain.top_ids).all()
    torch.testing.assert_close(mapped.top_logprobs, plain.top_logprobs, rtol=0, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(UnknownModelError, match="n_devices=2 requires CUDA"):
            bt.load_model(gpt2_folder, n_devices=2)
    with pytest.raises(ValueError, match="fits one device"):
        bt.load_model("smollm2-135m", device_map="auto")


@pytest.mark.skipif(not TL4, reason="Hugging Face folders load on TransformerLens 4")
def test_a_model_that_is_not_causal_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from beyond_top1.models import UnknownModelError, _quiet, smollm2_tokenizer

    tok = smollm2_tokenizer()
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=len(tok), max_position_embeddings=64,
    )  # fmt: skip
    with _quiet():
        BertForMaskedLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(UnknownModelError, match="not a causal language model"):
        bt.load_model(tmp_path)


def test_reproduce_ties_stages_to_the_line_and_the_folders_files(tmp_path):
    from beyond_top1.reproduce.graph import ModelRef

    ref = ModelRef("twin", "untrained:gpt2-small", device="cpu", seed=0)
    assert ref.identity()["transformer_lens_major"] == (4 if TL4 else 3)
    (tmp_path / "config.json").write_text("{}")
    folder = ModelRef("mine", str(tmp_path), device="cpu", seed=0)
    before = folder.identity()
    (tmp_path / "model.safetensors").write_bytes(b"new weights")
    assert folder.identity() != before
