"""Shared fixtures. Tests never reach the network: the hub is forced offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_model(
    *,
    n_layers: int = 3,
    d_model: int = 32,
    normalization: str = "RMS",
    seed: int = 0,
    d_vocab: int | None = None,
):
    """A small randomly initialised model with SmolLM2's tokenizer, on the installed
    TransformerLens line (a ``TransformerBridge`` on 4.x, a ``HookedTransformer`` on 3.9).

    ``normalization="RMS"``: Llama-like (rotary, gated SiLU MLP); ``"LN"``: GPT-2-like. The
    weights differ between the lines (each line's own initialiser). ``d_vocab`` defaults to the
    tokenizer's 49,152 tokens; pass a small value for tests that never need text.
    """
    from beyond_top1.bridge import transformer_lens_major

    name = f"tiny-{normalization.lower()}-{n_layers}l"
    if transformer_lens_major() >= 4:
        return _tiny_bridge(name, n_layers, d_model, normalization, seed, d_vocab)
    return _tiny_hooked_transformer(name, n_layers, d_model, normalization, seed, d_vocab)


def _tiny_bridge(name, n_layers, d_model, normalization, seed, d_vocab):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from beyond_top1.bridge import boot_from_hf_model
    from beyond_top1.models import _quiet, smollm2_tokenizer

    vocab = d_vocab or 49152
    scale = {"initializer_range": 0.8 / d_model**0.5}  # TransformerLens' init scale, as on 3.9
    if normalization == "RMS":
        config = LlamaConfig(
            hidden_size=d_model,
            intermediate_size=4 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=d_model // 8,
            num_key_value_heads=d_model // 8,
            head_dim=8,
            vocab_size=vocab,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            **scale,
        )
    else:
        config = GPT2Config(
            n_embd=d_model,
            n_layer=n_layers,
            n_head=d_model // 8,
            n_inner=4 * d_model,
            n_positions=64,
            vocab_size=vocab,
            activation_function="gelu_new",
            tie_word_embeddings=False,
            **scale,
        )
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        # Untrained models have near-zero residual updates; scale them so layers differ.
        with torch.no_grad():
            for param_name, param in hf_model.named_parameters():
                if param_name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")):
                    param.mul_(4.0)
    tokenizer = smollm2_tokenizer()  # the bridge needs one even for id-only tests
    return boot_from_hf_model(
        hf_model,
        name=name,
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        dtype=torch.float32,
        prepend_bos=False,
    )


def _tiny_hooked_transformer(name, n_layers, d_model, normalization, seed, d_vocab):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from beyond_top1.models import _quiet, smollm2_tokenizer

    rotary = normalization == "RMS"
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=4 * d_model,
        n_ctx=64,
        d_vocab=d_vocab or 49152,
        act_fn="silu" if rotary else "gelu_new",
        normalization_type=normalization,
        positional_embedding_type="rotary" if rotary else "standard",
        rotary_dim=8 if rotary else None,
        gated_mlp=rotary,
        final_rms=rotary,
        default_prepend_bos=False,
        model_name=name,
        seed=None,
    )
    tokenizer = smollm2_tokenizer() if d_vocab is None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet():
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    # Untrained TL models have near-zero residual updates; scale them up so layers differ.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(("W_O", "W_out")):
                param.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    """3-layer RMSNorm/rotary model (SmolLM2-like) with the real tokenizer."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_ln_model():
    """3-layer LayerNorm model (GPT-2-like) with the real tokenizer."""
    return make_tiny_model(normalization="LN", seed=1)


@pytest.fixture(scope="session")
def smollm2():
    """The trained default model (converted once, then read from the cache)."""
    from beyond_top1.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_reproduction(tmp_path_factory):
    """``reproduce`` at the test scale on a 6-layer tiny model and a LayerNorm twin (~20 s)."""
    from beyond_top1.reproduce import reproduce

    model = make_tiny_model(n_layers=6)
    twin = make_tiny_model(normalization="LN", seed=1)
    out = tmp_path_factory.mktemp("reproduce") / "run"
    result = reproduce(model, out, scale="test", twins={"tiny-ln": twin}, progress=False, log=None)
    return result, model, twin


@pytest.fixture(autouse=True)
def _fresh_view_session():
    """Each test starts as a fresh notebook session: its first inline view carries the
    CircuitsVis bundle (see beyond_top1.viz.view.bundle_mode)."""
    from beyond_top1.viz.view import bundle_mode

    bundle_mode("once")
    yield
