"""The tuned-lens interoperability fixture, and the by-hand check that tuned-lens reads our files.

Three steps; ``make`` and ``check`` run in a separate venv that has ``tuned-lens==0.2.0`` (our
package never imports it), ``export`` in the project's own venv::

    python3 -m venv /work/venv_tunedlens
    /work/venv_tunedlens/bin/pip install torch==2.13.0   # first: a pinned CPU build
    /work/venv_tunedlens/bin/pip install tuned-lens==0.2.0

    /work/venv_tunedlens/bin/python experiments/make_tuned_lens_fixture.py make
    .venv/bin/python experiments/make_tuned_lens_fixture.py export /tmp/ours
    /work/venv_tunedlens/bin/python experiments/make_tuned_lens_fixture.py check /tmp/ours

``make`` writes ``tests/fixtures/tuned_lens_tiny/`` (about 170 KB):

* ``hf_model/``: a randomly initialised 3-layer Llama (``LlamaForCausalLM``, d_model 32, vocab 64,
  RMSNorm with random scales, untied unembedding; seed 0), saved by ``save_pretrained``;
* ``lens/``: a ``tuned_lens.nn.TunedLens.from_model`` of it whose translators get seeded random,
  nonzero weights and biases, written by tuned-lens' own ``TunedLens.save`` (``config.json`` and
  ``params.pt``);
* ``expected.safetensors``: ``input_ids`` [2, 8], the model's ``hidden_states[:-1]``
  [3, 2, 8, 32], tuned-lens' ``transform_hidden(h_i, i)`` of each (``translated``) and its logits
  ``lens(h_i, i)`` (``lens_logits`` [3, 2, 8, 64]), and the model's own ``logits``.

``export DIR`` (our venv) loads ``hf_model`` as our toolkit's TransformerLens model (a
compatibility-mode bridge, or on TransformerLens 3.9 a converted ``HookedTransformer``), gives a
``beyond_top1`` ``TunedLens`` random weights, saves it with ``save_lens(..., format="tuned-lens")``
to ``DIR/lens`` and records our transform and log-probs of the fixture's hidden states in
``DIR/ours.safetensors``.

``check DIR`` (tuned-lens venv) loads ``DIR/lens`` with tuned-lens' own
``TunedLens.from_model_and_pretrained(hf_model, DIR/lens)``, fails on any warning it logs (an
unknown config key; the unembedding-hash warning is expected and reported, see below), and
compares its ``transform_hidden`` and log-softmax of ``lens(h, i)`` with ours.

Verified by hand (2026-12-02; torch 2.13.0, tuned-lens 0.2.0, transformers 5.24.0, numpy 2.4.6),
exporting from TransformerLens 3.9 and from 4.3: ``check`` passes with max |transform
difference| 1.9e-6 and max |log-prob difference| 1.9e-6 both times,
and tuned-lens logs no "Ignoring config key" warning. It logs its unembedding-hash warning, as
expected: our folders record the hash of TransformerLens' processed ``W_U.T``, not of the HF
``lm_head`` weight (which cannot be recomputed from a TransformerLens model). That recorded hash
equals ``tuned_lens.utils.tensor_hash`` of ``W_U.transpose(0, 1)`` computed in the tuned-lens
venv, i.e. what tuned-lens' ``Unembed`` hashes when handed the HookedTransformer itself.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tuned_lens_tiny"
MODEL_NAME = "beyond-top1/tiny-llama-tuned-lens-fixture"
HF_CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    initializer_range=0.3,
)


def make(out: Path) -> None:
    """Build the fixture with tuned-lens' own code (tuned-lens venv)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from tuned_lens.nn import TunedLens

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():  # random norm scales, so folding them into W_U matters
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
    model.config._name_or_path = MODEL_NAME
    model.save_pretrained(out / "hf_model")

    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for translator in lens:
            translator.weight.normal_(0, 0.1)
            translator.bias.normal_(0, 0.1)
    lens.save(out / "lens")

    input_ids = torch.randint(0, HF_CONFIG["vocab_size"], (2, 8))
    with torch.no_grad():
        output = model(input_ids, output_hidden_states=True)
        hidden = torch.stack(output.hidden_states[:-1])
        translated = torch.stack([lens.transform_hidden(h, i) for i, h in enumerate(hidden)])
        lens_logits = torch.stack([lens(h, i) for i, h in enumerate(hidden)])
    save_file(
        {
            "input_ids": input_ids,
            "hidden_states": hidden.contiguous(),
            "translated": translated.contiguous(),
            "lens_logits": lens_logits.contiguous(),
            "logits": output.logits.contiguous(),
        },
        out / "expected.safetensors",
    )
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


def tl_model_from_fixture(folder: Path = FIXTURE):
    """The fixture's Llama as our toolkit's model: a compatibility-mode ``TransformerBridge`` on
    TransformerLens 4, a ``HookedTransformer`` converted as ``beyond_top1.models`` converts
    SmolLM2 on 3.9 (folded norms, centred unembedding, either way)."""
    import torch
    from transformers import LlamaForCausalLM

    from beyond_top1.bridge import boot_from_hf_model, transformer_lens_major
    from beyond_top1.models import smollm2_tokenizer

    hf = LlamaForCausalLM.from_pretrained(folder / "hf_model", dtype=torch.float32).eval()
    if transformer_lens_major() >= 4:
        return boot_from_hf_model(
            hf,
            name=MODEL_NAME,
            tokenizer=smollm2_tokenizer(),  # the bridge wants one; the tests use token ids
            device=torch.device("cpu"),
            dtype=torch.float32,
            prepend_bos=False,
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=c.hidden_size // c.num_attention_heads,
        rotary_base=10000.0,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        model_name=MODEL_NAME,
        dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    )
    return model.eval()


def export(out: Path) -> None:
    """Write a lens with ``beyond_top1`` in tuned-lens' format (our venv)."""
    import torch
    from safetensors.torch import load_file, save_file

    from beyond_top1.lenses import TunedLens, save_lens

    model = tl_model_from_fixture()
    lens = TunedLens(model, include_embedding=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lens.weight.copy_(0.1 * torch.randn(lens.weight.shape, generator=generator))
        lens.bias.copy_(0.1 * torch.randn(lens.bias.shape, generator=generator))
    save_lens(lens, out / "lens", format="tuned-lens")
    hidden = load_file(FIXTURE / "expected.safetensors")["hidden_states"]
    with torch.no_grad():
        translated = torch.stack([lens.transform(h, i - 1) for i, h in enumerate(hidden)])
        log_probs = torch.stack([lens(h, i - 1).log_softmax(-1) for i, h in enumerate(hidden)])
    save_file({"translated": translated, "log_probs": log_probs}, out / "ours.safetensors")
    print(f"wrote {out}/lens and {out}/ours.safetensors")


def check(out: Path) -> None:
    """Load our folder with tuned-lens' own loader and compare (tuned-lens venv)."""
    import logging

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    from tuned_lens.nn import TunedLens

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    model = LlamaForCausalLM.from_pretrained(FIXTURE / "hf_model", dtype=torch.float32).eval()
    lens = TunedLens.from_model_and_pretrained(model, str(out / "lens"))
    logging.getLogger().removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    unexpected = [m for m in messages if "hash does not match" not in m]
    print("tuned-lens warnings:", messages or "none")
    if unexpected:
        sys.exit(f"FAIL: tuned-lens warned {unexpected}")

    hidden = load_file(FIXTURE / "expected.safetensors")["hidden_states"]
    ours = load_file(out / "ours.safetensors")
    with torch.no_grad():
        translated = torch.stack([lens.transform_hidden(h, i) for i, h in enumerate(hidden)])
        log_probs = torch.stack([lens(h, i).log_softmax(-1) for i, h in enumerate(hidden)])
    d_transform = (translated - ours["translated"]).abs().max().item()
    d_log_probs = (log_probs - ours["log_probs"]).abs().max().item()
    print(f"max |transform diff| {d_transform:.2e}, max |log-prob diff| {d_log_probs:.2e}")
    if d_transform > 1e-5 or d_log_probs > 1e-4:
        sys.exit("FAIL: tuned-lens reads our folder differently")
    print("OK: tuned-lens loads the folder and reproduces our lens")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["make", "export", "check"])
    parser.add_argument("dir", nargs="?", type=Path, help="output folder (export/check)")
    args = parser.parse_args(argv)
    if args.step == "make":
        make(args.dir or FIXTURE)
    elif args.dir is None:
        parser.error(f"{args.step} needs a folder")
    else:
        {"export": export, "check": check}[args.step](args.dir)


if __name__ == "__main__":
    main()
