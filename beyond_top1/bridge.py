"""Models on TransformerLens 4: a ``TransformerBridge`` in compatibility mode.

TransformerLens 4 removed ``HookedTransformer``; its ``TransformerBridge`` wraps a Hugging Face
model and, after ``enable_compatibility_mode()``, gives the same hook names
(``blocks.{l}.hook_resid_post``), the same processed weights (folded norms, centred writing
weights and unembedding, where the architecture allows them) and the same ``run_with_hooks`` /
``hooks()`` / ``run_with_cache`` as ``HookedTransformer`` did. This module boots one from a
Hugging Face model object, a local folder or a hub name; :mod:`beyond_top1.models` decides which
line to use.

Everything here imports ``transformer_lens`` (4.x) and ``transformers`` inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch


def transformer_lens_major() -> int:
    """The installed TransformerLens major version (3 or 4)."""
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


@contextlib.contextmanager
def quiet(*, progress_bars: bool = False):
    """Silence transformers' and TransformerLens' notices and log lines, and their progress bars
    unless ``progress_bars`` (keep them for hub downloads, which can take minutes)."""
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in ("root", "transformers", "transformer_lens")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*HookedTransformer.*deprecated.*")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def boot_from_hf_model(
    hf_model,
    *,
    name: str,
    tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    prepend_bos: bool | None = None,
    n_ctx: int | None = None,
):
    """A compatibility-mode bridge around an already built Hugging Face causal LM.

    Args:
        hf_model: e.g. ``AutoModelForCausalLM.from_config(...)`` or ``.from_pretrained(...)``.
        name: recorded as ``cfg.model_name`` (lens files and scans are tied to it).
        prepend_bos: the model's ``default_prepend_bos`` (default: the bridge's choice).
        n_ctx: context length to record (default: the Hugging Face config's).
    """
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    with quiet():
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
        bridge.enable_compatibility_mode(disable_warnings=True)
    return _finish(bridge, name=name, prepend_bos=prepend_bos, n_ctx=n_ctx)


def boot_pretrained(
    name_or_path: str,
    *,
    device: torch.device | None,
    dtype: torch.dtype,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    n_ctx: int | None = None,
):
    """A compatibility-mode bridge for a hub name or a local Hugging Face folder.

    TransformerLens' weight processing applies where the architecture allows it (it warns and
    skips centring or folding where it does not).

    ``device_map`` / ``n_devices`` are passed to ``TransformerBridge.boot_transformers``
    (accelerate's placement over several devices); they exclude ``device``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    placement: dict[str, Any] = {"dtype": dtype}
    if device_map is not None or (n_devices or 1) > 1:
        placement.update(device_map=device_map, n_devices=n_devices)
    else:
        placement["device"] = device
    if n_ctx is not None:
        placement["n_ctx"] = n_ctx
    with quiet(progress_bars=not os.path.isdir(name_or_path)):  # a download shows its progress
        bridge = TransformerBridge.boot_transformers(name_or_path, **placement)
        bridge.enable_compatibility_mode(disable_warnings=True)
    name = Path(name_or_path).name if os.path.isdir(name_or_path) else name_or_path
    return _finish(bridge, name=name, prepend_bos=None, n_ctx=None)


def _finish(bridge, *, name: str, prepend_bos: bool | None, n_ctx: int | None):
    bridge.cfg.model_name = name
    if prepend_bos is not None:
        bridge.cfg.default_prepend_bos = prepend_bos
    if n_ctx is not None:
        bridge.cfg.n_ctx = n_ctx
    return bridge.eval()


def check_compatibility_mode(model) -> None:
    """Raise unless a bridge runs in compatibility mode (the toolkit's hook names and folded
    weights need it)."""
    from beyond_top1.hooked import is_bridge

    if is_bridge(model) and not getattr(model, "compatibility_mode", False):
        raise ValueError(
            "this TransformerBridge is not in compatibility mode; call "
            "model.enable_compatibility_mode() first (beyond-top1 reads the residual stream "
            "through the HookedTransformer hook names and folded weights it provides), or load "
            "the model with beyond_top1.load_model(...)"
        )


def supported_names() -> list[str]:
    """Hub names TransformerLens 4 knows (official names, then aliases)."""
    from transformer_lens import supported_models

    names = list(supported_models.OFFICIAL_MODEL_NAMES)
    names += [a for aliases in supported_models.MODEL_ALIASES.values() for a in aliases]
    return list(dict.fromkeys(names))


__all__ = [
    "boot_from_hf_model",
    "boot_pretrained",
    "check_compatibility_mode",
    "quiet",
    "supported_names",
    "transformer_lens_major",
]
