"""Models on TransformerLens 3.9: ``HookedTransformer`` construction.

Only :mod:`beyond_top1.models` calls this module, and only when TransformerLens 3.x is
installed (``transformer_lens`` is imported inside the functions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from beyond_top1.bridge import quiet


def supported_names() -> list[str]:
    """Official names and aliases ``HookedTransformer.from_pretrained`` knows."""
    from transformer_lens import loading_from_pretrained as loading

    names = list(loading.OFFICIAL_MODEL_NAMES)
    names += [alias for aliases in loading.MODEL_ALIASES.values() for alias in aliases]
    return names


def from_pretrained(name: str, *, device, dtype, n_ctx: int | None = None):
    from transformer_lens import HookedTransformer

    extra = {} if n_ctx is None else {"n_ctx": n_ctx}
    with quiet(progress_bars=True):
        return HookedTransformer.from_pretrained(name, device=device, dtype=dtype, **extra)


def save_converted_llama(hf_model, tokenizer, cfg: dict[str, Any], folder: Path) -> None:
    """Convert a Hugging Face Llama with TransformerLens' standard processing (folded norms,
    centred writing weights and unembedding) and save its weights and config in ``folder``."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    config = HookedTransformerConfig(**cfg, dtype=torch.float32)
    state_dict = convert_llama_weights(hf_model, config)
    with quiet():
        model = HookedTransformer(config, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    params = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    save_file(params, folder / "weights.safetensors")
    saved = {k: v for k, v in model.cfg.to_dict().items() if _jsonable(v)}
    (folder / "config.json").write_text(json.dumps(saved, indent=1, sort_keys=True))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def read_converted(folder: Path) -> tuple[dict, dict]:
    """The saved config and CPU weights, checked against the architecture they describe."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg_dict = json.loads((folder / "config.json").read_text())
    for derived in ("n_params", "d_vocab_out", "tokenizer_prepends_bos"):
        cfg_dict.pop(derived, None)
    params = load_file(folder / "weights.safetensors")
    meta = HookedTransformerConfig(**{**cfg_dict, "device": "meta", "init_weights": False})
    with quiet(), torch.device("meta"):
        skeleton = HookedTransformer(meta, move_to_device=False)
    expected = {name for name, _ in skeleton.named_parameters()}
    if set(params) != expected:
        raise RuntimeError(
            f"cached weights do not fit the model (missing {sorted(expected - set(params))[:3]}, "
            f"unexpected {sorted(set(params) - expected)[:3]})"
        )
    return cfg_dict, params


def model_from_converted(cfg_dict: dict, params: dict, tokenizer, *, device, dtype, n_ctx: int):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg_dict = dict(cfg_dict, n_ctx=n_ctx, device=str(device), dtype=dtype, init_weights=False)
    cfg = HookedTransformerConfig(**cfg_dict)
    with quiet():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    model.load_state_dict(params, strict=False)
    return model


def build_untrained(cfg_dict: dict, *, name: str, tokenizer, seed: int, device, dtype):
    """A ``HookedTransformer`` at TransformerLens' random initialisation, seeded."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**cfg_dict, model_name=name, dtype=dtype, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with quiet():
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    return model.to(device, print_details=False)
