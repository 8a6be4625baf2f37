"""The model boundary: the only module that reads a model's internals (DESIGN.md §2).

Analyses touch a model through hook names, ``run_with_cache``, ``ln_final``, the unembedding
(``W_U``, ``b_U``), ``cfg`` and the tokenizer, and only through the functions here. Keeping the
surface this small is what lets the toolkit follow TransformerLens from ``HookedTransformer``
(3.x) to ``TransformerBridge`` (4.x), which keeps these hook names as aliases.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

EMBED_LAYER = -1


def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def d_model(model) -> int:
    return int(model.cfg.d_model)


def d_vocab(model) -> int:
    return int(model.W_U.shape[-1])


def n_ctx(model) -> int:
    return int(model.cfg.n_ctx)


def model_name(model) -> str:
    return str(getattr(model.cfg, "model_name", "") or "unnamed")


def model_device(model) -> torch.device:
    return model.W_U.device


def model_dtype(model) -> torch.dtype:
    return model.W_U.dtype


def check_layer(model, layer: int) -> int:
    """Validate a layer index: ``0..L-1`` for ``resid_post``, ``-1`` for the embedding."""
    L = n_layers(model)
    if not isinstance(layer, int) or not (EMBED_LAYER <= layer < L):
        raise ValueError(
            f"layer must be an int in [-1, {L - 1}] (-1 = embedding, {L - 1} = last), got {layer!r}"
        )
    return layer


def resid_hook_name(layer: int) -> str:
    """Hook name for layer ``l``'s output: ``blocks.{l}.hook_resid_post`` (``-1`` = embedding)."""
    if layer == EMBED_LAYER:
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer}.hook_resid_post"


def final_norm(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """Apply ``ln_final`` to a residual, recomputing the norm scale from this residual."""
    return model.ln_final(resid)


def unembed(model, normed: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits from a final-normed residual: ``x @ W_U + b_U``."""
    return normed @ model.W_U + model.b_U


def run_with_residuals(
    model,
    tokens: Int[Tensor, "batch pos"],
    layers: tuple[int, ...],
) -> Float[Tensor, "batch pos layer d_model"]:
    """Run the model once, caching only the residual streams of ``layers``."""
    names = [resid_hook_name(l) for l in layers]
    wanted = set(names)
    with torch.no_grad():  # not inference_mode: callers may train on these tensors
        _, cache = model.run_with_cache(
            tokens, names_filter=lambda name: name in wanted, return_type=None
        )
        return torch.stack([cache[name] for name in names], dim=2)


def tokenizer(model):
    if model.tokenizer is None:
        raise ValueError("This model has no tokenizer; pass token ids instead of text.")
    return model.tokenizer


def prepends_bos(model) -> bool:
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def token_strings(model, ids) -> list[str]:
    """Decode each id on its own (the text a token contributes)."""
    tok = tokenizer(model)
    return [tok.decode([int(i)]) for i in ids]


def unembedding_fingerprint(model) -> str:
    """SHA-256 of ``W_U``, ``b_U`` and ``ln_final``'s parameters; ties artefacts to a model."""
    digest = hashlib.sha256()
    tensors = [model.W_U, model.b_U, *[p for _, p in sorted(model.ln_final.named_parameters())]]
    for tensor in tensors:
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


# --- lensexp: tuned-lens training ------------------------------------------------------------


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """Within the block no model parameter requires grad (restored on exit).

    Training a lens backpropagates through the final norm and unembedding; without this the
    model's own ``W_U.grad`` would be computed (a third of the cost) and left on the model.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def unembedding_weights(
    model,
) -> tuple[Float[Tensor, "d_model d_vocab"], Float[Tensor, " d_vocab"]]:
    """``(W_U, b_U)``, detached (e.g. to keep one low-precision copy for training)."""
    return model.W_U.detach(), model.b_U.detach()
