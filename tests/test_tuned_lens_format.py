"""Lenses in the tuned-lens package's format: round trip, a folder written by tuned-lens itself
(tests/fixtures/tuned_lens_tiny, made by experiments/make_tuned_lens_fixture.py), bad inputs,
and the LayerNorm centring rule. tuned-lens is not imported here (nor by the package)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file

from beyond_top1 import hooked
from beyond_top1.lenses import (
    LensFileError,
    LinearShortcutLens,
    LogitLens,
    TunedLens,
    load_lens,
    save_lens,
)
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.tuned_lens_format import (
    TunedLensHashWarning,
    centred_residual,
    model_unembed_hash,
    unembed_hash,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tuned_lens_tiny"
TUNED_LENS_KEYS = {
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
}


@pytest.fixture(scope="module")
def rms_model():
    return make_tiny_model(d_vocab=100)


def _random_tuned(model, *, include_embedding=True, seed=0) -> TunedLens:
    lens = TunedLens(model, include_embedding=include_embedding)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=generator))
        lens.bias.copy_(0.2 * torch.randn(lens.bias.shape, generator=generator))
    return lens.eval()


def _resid(model, seed=1):
    return torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("include_embedding", [True, False])
def test_round_trip_matches_the_saved_params(rms_model, tmp_path, include_embedding):
    lens = _random_tuned(rms_model, include_embedding=include_embedding)
    path = save_lens(lens, tmp_path / "lens", format="tuned-lens")
    config = json.loads((path / "config.json").read_text())
    assert set(config) == TUNED_LENS_KEYS
    assert (config["d_model"], config["num_hidden_layers"]) == (32, 3)
    assert config["lens_type"] == "linear_tuned_lens" and config["bias"] is True
    assert config["unembed_hash"] == model_unembed_hash(rms_model)
    params = torch.load(path / "params.pt", weights_only=True)
    assert sorted(params) == sorted(f"{i}.{k}" for i in range(3) for k in ("weight", "bias"))
    if not include_embedding:  # the identity translator for hidden_states[0]
        assert not params["0.weight"].any() and not params["0.bias"].any()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_lens(path, rms_model)
    assert isinstance(loaded, TunedLens) and loaded.include_embedding == include_embedding
    assert loaded.layers == lens.layers
    h = _resid(rms_model)
    for layer in lens.layers[:-1]:
        w, b = params[f"{layer + 1}.weight"].double(), params[f"{layer + 1}.bias"].double()
        reference = (h.double() + h.double() @ w.T + b).float()  # tuned-lens: h + W h + b
        torch.testing.assert_close(loaded.transform(h, layer), reference)  # fp32 tolerance
        torch.testing.assert_close(lens.transform(h, layer), reference)
    assert torch.equal(loaded.transform(h, 2), h)  # the last layer is the identity


def test_plain_tuned_lens_folder_checks_the_hash(rms_model, tmp_path):
    path = save_lens(_random_tuned(rms_model), tmp_path / "lens", format="tuned-lens")
    (path / "beyond_top1_lens.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_lens(path, rms_model)  # the hash of W_U.T matches: no warning
    other = make_tiny_model(d_vocab=100, seed=5)
    other.cfg.model_name = "someone-else"
    with pytest.warns(TunedLensHashWarning, match="unembed_hash differs.*does not match"):
        load_lens(path, other)


def test_affine_lenses_are_written_through_from_lens(rms_model, tmp_path):
    linear = LinearShortcutLens(rms_model, include_embedding=True, bias=True)
    with torch.no_grad():
        linear.weight.add_(0.1 * torch.randn(linear.weight.shape))
        linear.bias.add_(0.1 * torch.randn(linear.bias.shape))
    loaded = load_lens(save_lens(linear, tmp_path / "linear", format="tuned-lens"), rms_model)
    h = _resid(rms_model)
    for layer in linear.layers:
        torch.testing.assert_close(loaded.transform(h, layer), linear.transform(h, layer))

    logit = load_lens(save_lens(LogitLens(rms_model), tmp_path / "logit", format="tuned-lens"),
                      rms_model)  # fmt: skip
    assert not logit.include_embedding and not logit.weight.any()

    class Squares(Lens):
        def transform(self, resid, layer):
            return resid * resid

    with pytest.raises(ValueError, match="not affine"):
        save_lens(Squares(rms_model), tmp_path / "squares", format="tuned-lens")
    with pytest.raises(ValueError, match="format must be one of"):
        save_lens(logit, tmp_path / "x", format="hf")


# ---------------------------------------------------------------------------------------------
# A folder written by tuned-lens' own TunedLens.save
# ---------------------------------------------------------------------------------------------


def _fixture_tl_model():
    """The fixture's Hugging Face Llama as a processed HookedTransformer (as the script does)."""
    script = Path(__file__).parents[1] / "experiments" / "make_tuned_lens_fixture.py"
    spec = importlib.util.spec_from_file_location("make_tuned_lens_fixture", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tl_model_from_fixture(FIXTURE)


def test_reads_a_folder_written_by_tuned_lens():
    model = _fixture_tl_model()
    expected = load_file(FIXTURE / "expected.safetensors")
    with pytest.warns(TunedLensHashWarning, match="unembed_hash differs.*matches the model's name"):
        lens = load_lens(FIXTURE / "lens", model)
    assert isinstance(lens, TunedLens) and lens.include_embedding
    assert lens.training_settings["imported_from"] == "tuned-lens"

    # tuned-lens' translator i reads hidden_states[i] = our layer i - 1
    hidden, translated = expected["hidden_states"], expected["translated"]
    for i in range(3):
        torch.testing.assert_close(lens.transform(hidden[i], i - 1), translated[i])

    # ... and hidden_states[i] is TransformerLens' residual at layer i - 1 (RMSNorm: exact), so
    # our lens on the TransformerLens model gives tuned-lens' distributions
    with torch.no_grad():
        logits, cache = model.run_with_cache(expected["input_ids"])
    torch.testing.assert_close(logits.log_softmax(-1), expected["logits"].log_softmax(-1))
    for i in range(3):
        name = "blocks.0.hook_resid_pre" if i == 0 else f"blocks.{i - 1}.hook_resid_post"
        torch.testing.assert_close(cache[name], hidden[i], rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            ours = lens(cache[name], i - 1).log_softmax(-1)
        torch.testing.assert_close(
            ours, expected["lens_logits"][i].log_softmax(-1), rtol=1e-4, atol=1e-4
        )


def test_unembed_hash_is_tuned_lens_hash():
    from safetensors.torch import load_file as load

    lm_head = load(FIXTURE / "hf_model" / "model.safetensors")["lm_head.weight"]
    config = json.loads((FIXTURE / "lens" / "config.json").read_text())
    assert unembed_hash(lm_head) == config["unembed_hash"]
    assert unembed_hash(lm_head + 0.3) != config["unembed_hash"]


def test_fixture_dimensions_are_checked():
    model = make_tiny_model(d_model=32, n_layers=3, d_vocab=64)
    with pytest.warns(TunedLensHashWarning):
        lens = load_lens(FIXTURE / "lens", model)  # any model of the right size, with a warning
    expected = load_file(FIXTURE / "expected.safetensors")
    torch.testing.assert_close(lens.transform(expected["hidden_states"][1], 0),
                               expected["translated"][1])  # fmt: skip
    with pytest.raises(LensFileError, match="d_model=32, 3 layers.*d_model=16, 3 layers"):
        load_lens(FIXTURE / "lens", make_tiny_model(d_model=16, d_vocab=64))
    with pytest.raises(LensFileError, match="d_model=32, 3 layers.*d_model=32, 2 layers"):
        load_lens(FIXTURE / "lens", make_tiny_model(n_layers=2, d_vocab=64))


# ---------------------------------------------------------------------------------------------
# Bad inputs and data safety
# ---------------------------------------------------------------------------------------------


def test_bad_folders_raise_lens_file_errors(rms_model, tmp_path):
    with pytest.raises(LensFileError, match="is not a lens folder.*neither"):
        load_lens(FIXTURE / "hf_model", rms_model)  # a Hugging Face model folder

    path = save_lens(_random_tuned(rms_model), tmp_path / "lens", format="tuned-lens")
    other = make_tiny_model(d_vocab=100, seed=3)
    with pytest.raises(LensFileError, match="saved for model 'tiny-rms-3l'.*unembedding"):
        load_lens(path, other)  # same name and size, another unembedding (beyond_top1_lens.json)

    params = path / "params.pt"
    data = params.read_bytes()
    params.write_bytes(data[: len(data) // 2])
    with pytest.raises(LensFileError, match="params.pt does not match the checksum"):
        load_lens(path, rms_model)
    (path / "beyond_top1_lens.json").unlink()
    with pytest.raises(LensFileError, match="corrupt or truncated tuned-lens.*cannot be read"):
        load_lens(path, rms_model)
    torch.save({"0.weight": torch.zeros(32, 32)}, params)
    with pytest.raises(LensFileError, match="does not hold 3 translators of d_model 32"):
        load_lens(path, rms_model)
    params.unlink()
    with pytest.raises(LensFileError, match="params.pt is missing"):
        load_lens(path, rms_model)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "lens_type": "mlp_lens"}))
    with pytest.raises(LensFileError, match="'mlp_lens' lens"):
        load_lens(path, rms_model)


def test_writing_respects_other_peoples_folders(rms_model, tmp_path):
    foreign = tmp_path / "from_tuned_lens"
    shutil.copytree(FIXTURE / "lens", foreign)  # written by tuned-lens, not by us
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    with pytest.raises(LensFileError, match="not a lens folder saved by beyond-top1"):
        save_lens(_random_tuned(rms_model), foreign, format="tuned-lens")
    with pytest.raises(LensFileError, match="not a lens folder saved by beyond-top1"):
        save_lens(_random_tuned(rms_model), foreign)
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before

    # our own folder may change format; the other format's files go
    path = tmp_path / "lens"
    save_lens(_random_tuned(rms_model), path)
    save_lens(_random_tuned(rms_model), path, format="tuned-lens")
    assert not (path / "weights.safetensors").exists() and (path / "params.pt").exists()
    save_lens(_random_tuned(rms_model), path)
    assert not (path / "params.pt").exists() and (path / "weights.safetensors").exists()
    assert not (path / "beyond_top1_lens.json").exists()


# ---------------------------------------------------------------------------------------------
# LayerNorm models with centred writing weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def centred_ln_model():
    """A random GPT-2-like model with TransformerLens' default processing: folded norms and
    centred writing weights, so its residual is ``h - mean(h)`` of the Hugging Face model's."""
    model = make_tiny_model(normalization="LN", seed=1, d_vocab=100)
    if type(model).__name__ == "HookedTransformer":  # 3.9: make_tiny_model leaves it raw
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model.eval()


def test_centred_residual_is_detected(rms_model, centred_ln_model):
    assert centred_residual(centred_ln_model) and not centred_residual(rms_model)
    generator = torch.Generator().manual_seed(0)
    w_e, w_pos = torch.randn(100, 32, generator=generator), torch.randn(64, 32, generator=generator)
    cfg = SimpleNamespace(normalization_type="LN", positional_embedding_type="standard")
    assert not centred_residual(SimpleNamespace(cfg=cfg, W_E=w_e, W_pos=w_pos))
    w_e, w_pos = w_e - w_e.mean(-1, keepdim=True), w_pos - w_pos.mean(-1, keepdim=True)
    assert centred_residual(SimpleNamespace(cfg=cfg, W_E=w_e, W_pos=w_pos))
    uncentred_pos = w_pos + 0.5
    assert not centred_residual(SimpleNamespace(cfg=cfg, W_E=w_e, W_pos=uncentred_pos))


def test_centred_layernorm_export_is_exact(centred_ln_model, tmp_path):
    """tuned-lens on the HF model: ``h' = h + W h + b`` on the uncentred hidden state ``h``, then
    the final LayerNorm, which centres ``h'`` first (as the model's own ``ln_final`` does), and
    the unembedding; our lens reads ``c = h - mean(h)``. Same distributions."""
    model = centred_ln_model
    lens = _random_tuned(model)
    path = save_lens(lens, tmp_path / "lens", format="tuned-lens")
    params = torch.load(path / "params.pt", weights_only=True)
    again = load_lens(path, model)  # W 1 = 0: readable on the centred model too
    h = 3 * _resid(model) + torch.randn(5, 1)  # per-token means, as HF hidden states have
    c = h - h.mean(-1, keepdim=True)
    with torch.no_grad():
        for layer in lens.layers:
            if layer == model.cfg.n_layers - 1:
                h_out = h
            else:
                w, b = params[f"{layer + 1}.weight"], params[f"{layer + 1}.bias"]
                h_out = h + h @ w.T + b
            as_hf = hooked.unembed(model, hooked.final_norm(model, h_out)).log_softmax(-1)
            want = lens(c, layer).log_softmax(-1)
            torch.testing.assert_close(as_hf, want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(again(c, layer).log_softmax(-1), want, rtol=1e-4, atol=1e-4)


def test_centred_layernorm_refuses_hf_trained_translators(centred_ln_model, tmp_path):
    path = tmp_path / "from_hf"
    path.mkdir()
    config = {"base_model_name_or_path": "gpt2", "d_model": 32, "num_hidden_layers": 3,
              "bias": True, "base_model_revision": None, "unembed_hash": None,
              "lens_type": "linear_tuned_lens"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(3):
        state[f"{i}.weight"] = 0.1 * torch.randn(32, 32, generator=generator)
        state[f"{i}.bias"] = 0.1 * torch.randn(32, generator=generator)
    torch.save(state, path / "params.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TunedLensHashWarning)
        with pytest.raises(LensFileError, match="writing weights are centred.*lacks each token's"):
            load_lens(path, centred_ln_model)
        # a translator whose W 1 is a multiple of 1 reads exactly: accepted
        for i in range(3):
            w = state[f"{i}.weight"]
            state[f"{i}.weight"] = w - w.sum(1, keepdim=True) / 32 + 0.25 / 32
        torch.save(state, path / "params.pt")
        load_lens(path, centred_ln_model)
