"""Any Hugging Face causal LM, through ``load_model(folder)`` (TransformerLens 4's bridge).

Tiny randomly initialised models of architectures with features SmolLM2 lacks, built with
``transformers`` from a config and saved to a temporary folder:

* GPT-2: LayerNorm, biases, learned positions;
* GPT-NeoX (Pythia): parallel attention and MLP, partial rotary;
* Qwen2: QKV biases, grouped-query attention;
* Gemma-2: logit soft-capping, pre- and post-norms, ``1 + w`` norm weights, scaled embeddings.

References are the Hugging Face model's own forward pass and ``numpy.linalg.lstsq``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import beyond_top1 as bt
from beyond_top1 import hooked
from beyond_top1.bridge import transformer_lens_major
from beyond_top1.data import tokenize

pytestmark = pytest.mark.skipif(
    transformer_lens_major() < 4,
    reason="loading a Hugging Face folder needs TransformerLens 4 (3.9 loads only its own names)",
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Paris is the capital of France, and Rome is the capital of",
    "1, 2, 3, 4, 5, 6, 7, 8, 9",
]


def _configs(vocab: int, bos: int, eos: int) -> dict:
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, Qwen2Config

    ids = {"bos_token_id": bos, "eos_token_id": eos, "vocab_size": vocab}
    return {
        "gpt2": GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **ids),
        "gpt-neox": GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=64, **ids,
        ),
        "qwen2": Qwen2Config(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False, **ids,
        ),
        "gemma-2": Gemma2Config(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64, max_position_embeddings=64,
            final_logit_softcapping=5.0, attn_logit_softcapping=50.0, sliding_window=16, **ids,
        ),
    }  # fmt: skip


ARCHITECTURES = ("gpt2", "gpt-neox", "qwen2", "gemma-2")
_WRITERS = ("o_proj.weight", "down_proj.weight", "c_proj.weight", "dense.weight", "dense_4h_to_h")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_hf(request, tmp_path_factory):
    """``(name, Hugging Face model, folder, tokenizer)`` of one tiny architecture."""
    from transformers import AutoModelForCausalLM

    from beyond_top1.models import _quiet, smollm2_tokenizer

    tok = smollm2_tokenizer()
    config = _configs(len(tok), tok.bos_token_id or 0, tok.eos_token_id or 0)[request.param]
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():  # random inits barely move the residual; make layers differ
            for name, param in hf.named_parameters():
                if any(part in name for part in _WRITERS):
                    param.mul_(4.0)
                elif param.ndim == 1 and ("norm" in name or "ln_" in name):
                    param.add_(0.3 * torch.randn_like(param))  # norms that folding must move
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return request.param, hf, folder, tok


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_folder_loads_with_the_models_numerics(tiny_hf):
    name, hf, folder, tok = tiny_hf
    model = bt.load_model(str(folder))
    assert hooked.is_bridge(model) and model.compatibility_mode
    assert hooked.n_layers(model) == 3 and hooked.model_name(model) == folder.name
    if name == "gemma-2":
        assert hooked.logit_softcap(model) == 5.0
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        own = model(ids)[0].double().log_softmax(-1)
    torch.testing.assert_close(own, _hf_logprobs(hf, ids[0].tolist()), atol=2e-5, rtol=0)
    # the toolkit's own norm (computed in float64 by the read-out) equals the bridge's module
    resid = hooked.run_with_residuals(model, ids, (2,))[:, :, 0]
    with torch.no_grad():
        torch.testing.assert_close(hooked.final_norm(model, resid), model.ln_final(resid))
        torch.testing.assert_close(
            hooked.final_norm(model, resid.double()).float(), model.ln_final(resid)
        )


def test_scan_and_linear_lens(tiny_hf, tmp_path):
    """A scan and a linear-lens fit run; the last layer reproduces the model's log-probs, and
    the fitted map is the least-squares solution."""
    name, hf, folder, tok = tiny_hf
    model = bt.load_model(str(folder))
    scan = bt.scan(model, TEXTS, k=3, progress=False, score_first=True, out=tmp_path / "scan")
    tokens = [tokenize(model, t) for t in TEXTS]  # with BOS where the model prepends one
    bos = int(hooked.prepends_bos(model))
    assert len(scan) == sum(len(ids) - bos for ids in tokens)
    assert len(bt.load_scan(tmp_path / "scan")) == len(scan)
    # the scan's final-layer top-3 = the Hugging Face model's, at every scored position
    final_top = torch.cat([_hf_logprobs(hf, ids)[bos:].topk(3).indices for ids in tokens])
    assert scan.top_ids[:, -1].tolist() == final_top.tolist()

    ridge = 1e-4
    lens = bt.LinearShortcutLens.fit(
        model, TEXTS, ridge=ridge, bias=True, score_first=True, progress=False
    )
    resid = hooked.run_with_residuals(model, torch.tensor([tokens[1]]), (0, 2))[0]
    with torch.no_grad():
        last = lens(resid[:, 1], 2).double().log_softmax(-1)
    torch.testing.assert_close(last, _hf_logprobs(hf, tokens[1]), atol=2e-5, rtol=0)

    # the layer 0 -> 2 map against numpy.linalg.lstsq on the same activations (float64), the
    # ridge written as extra rows (LayerNorm models' centred residuals are rank-deficient)
    xs, ys = [], []
    for ids in tokens:
        r = hooked.run_with_residuals(model, torch.tensor([ids]), (0, 2))[0, bos:]
        xs.append(r[:, 0].double().numpy())
        ys.append(r[:, 1].double().numpy())
    x, y = np.vstack(xs), np.vstack(ys)
    d = x.shape[1]
    penalty = np.sqrt(ridge * (x**2).sum(0).mean())
    design = np.block([[x, np.ones((len(x), 1))], [penalty * np.eye(d), np.zeros((d, 1))]])
    target = np.vstack([y, np.zeros((d, d))])
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    got = lens.transform(torch.from_numpy(x), 0).numpy()
    np.testing.assert_allclose(got, design[: len(x)] @ solution, atol=1e-6 * np.abs(y).max())
