"""The model boundary: the only module that reads a model's internals (docs/conventions.md).

Analyses touch a model through hook names, ``run_with_cache``, ``ln_final``, the unembedding
(``W_U``, ``b_U``), ``cfg`` and the tokenizer, and only through the functions here. The model is
a TransformerLens 3.9 ``HookedTransformer`` or a TransformerLens 4 ``TransformerBridge`` in
compatibility mode (which keeps these names as aliases); where the two differ (the final norm in
float64, the key/value cache), the functions here decide (docs/conventions.md, "TransformerLens
lines"). ``transformer_lens`` itself is imported only inside the few functions that need its
classes, so that importing the toolkit stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1.hooks.replace import SUBMODULE_KINDS, submodule_hook_names  # noqa: F401 - re-exported

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


def architecture(model) -> str | None:
    """The Hugging Face architecture name (``"LlamaForCausalLM"``), where the model records it."""
    cfg = model.cfg
    name = getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)
    return str(name) if name else None


def is_bridge(model) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge``."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


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
    """Apply ``ln_final`` to a residual, recomputing the norm scale from this residual, in the
    residual's dtype (float64 in, float64 out), without firing ``ln_final``'s hooks on a bridge."""
    if is_bridge(model):
        return _bridge_norm(model.ln_final, resid)
    return model.ln_final(resid)


def _bridge_norm(norm, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """A TransformerLens 4 normalisation bridge's function, computed in ``x``'s dtype: RMSNorm
    or LayerNorm, with the wrapped module's weight (``1 + w`` where the architecture stores an
    offset, as Gemma does), bias and epsilon. The bridge itself runs the Hugging Face module,
    which refuses a float64 input against float32 weights."""
    module = norm.original_component
    if isinstance(module, torch.nn.Identity):
        return x
    if not norm.uses_rms_norm:
        x = x - x.mean(-1, keepdim=True)
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(norm.config, "eps", 1e-5)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps))
    weight = getattr(module, "weight", None)
    if weight is not None:
        weight = weight.to(x.device, x.dtype)
        x = x * ((1.0 + weight) if norm.uses_weight_offset else weight)
    bias = getattr(module, "bias", None)
    if bias is not None and not norm.uses_rms_norm:
        x = x + bias.to(x.device, x.dtype)
    return x


def unembed(model, normed: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits from a final-normed residual: ``x @ W_U + b_U`` (soft-capped if the model is)."""
    logits = normed @ model.W_U + model.b_U
    cap = logit_softcap(model)
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def unembedding(model) -> tuple[Float[Tensor, "d_model d_vocab"], Float[Tensor, " d_vocab"]]:
    """``(W_U, b_U)``, detached."""
    return model.W_U.detach(), model.b_U.detach()


def logit_softcap(model) -> float:
    """The model's output logit soft-cap (``<= 0``: none)."""
    return float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)


def run_with_residuals(
    model,
    tokens: Int[Tensor, "batch pos"],
    layers: tuple[int, ...],
    *,
    fwd_hooks=(),
) -> Float[Tensor, "batch pos layer d_model"]:
    """Run the model once, caching only the residual streams of ``layers``; ``fwd_hooks``
    (TransformerLens ``(name, function)`` pairs) are active during the run and removed after."""
    names = [resid_hook_name(l) for l in layers]
    wanted = set(names)
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        # not inference_mode: callers may train on these tensors
        _, cache = model.run_with_cache(
            tokens, names_filter=lambda name: name in wanted, return_type=None
        )
        device = model_device(model)  # a model placed over several devices caches on each
        return torch.stack([cache[name].to(device) for name in names], dim=2)


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
    """SHA-256 of ``W_U``, ``b_U`` and ``ln_final``'s non-identity parameters; ties artefacts to
    a model. A folded norm's identity weight (all ones; all zeros where the weight is an offset
    from one, as Gemma's) and zero bias are left out: a bridge keeps them as parameters where
    ``HookedTransformer`` has none, and both lines must give the same fingerprint."""
    digest = hashlib.sha256()
    offset = bool(getattr(model.ln_final, "uses_weight_offset", False))
    norm = []
    for name, param in sorted(model.ln_final.named_parameters()):
        identity = 1.0 if name.endswith("weight") and not offset else 0.0
        if not bool((param.detach() == identity).all()):
            norm.append(param)
    for tensor in [model.W_U, model.b_U, *norm]:
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Early exit (issue 6): step-by-step decoding with a key/value cache
# ---------------------------------------------------------------------------------------------


def supports_tl_kv_cache(model) -> bool:
    """Whether blocks can be run one at a time on a TransformerLens key/value cache.

    ``HookedTransformer`` (3.x) can; a TransformerLens 4 ``TransformerBridge`` runs Hugging
    Face's attention modules, which take Hugging Face's cache, not TransformerLens'."""
    return not is_bridge(model)


def check_stepwise_decoding(model) -> None:
    """Raise if ``model``'s architecture is outside what the block-by-block decoder supports."""
    if not supports_tl_kv_cache(model):
        raise NotImplementedError(
            "early-exit decoding runs the model one block at a time on a TransformerLens "
            "key/value cache (HookedTransformer.blocks[l](x, past_kv_cache_entry=...) and "
            "input_to_embed(..., past_kv_cache=...)); a TransformerLens 4 TransformerBridge "
            "runs Hugging Face attention modules that take a Hugging Face cache instead, so it "
            "is not supported there yet. Simulated early exit on a scan "
            "(beyond_top1.simulate_exit / `beyond-top1 early-exit simulate`) works on both; "
            "for decoding, install TransformerLens 3.9 (bash scripts/setup.sh with "
            "TL_LINE=3, see the README)"
        )
    cfg = model.cfg
    problems = []
    if cfg.positional_embedding_type == "shortformer":
        problems.append("shortformer positional embeddings")
    if architecture(model) in _post_norm_architectures():
        problems.append(f"post-norm architecture {architecture(model)}")
    if cfg.attention_dir != "causal":
        problems.append("bidirectional attention")
    if problems:
        raise NotImplementedError(
            "early-exit decoding supports pre-norm causal decoders; this model has "
            + ", ".join(problems)
        )


_POST_NORM_ARCHITECTURES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _post_norm_architectures() -> tuple[str, ...]:
    """Ours, plus the list of the installed TransformerLens (its module moved in 4.x)."""
    names = set(_POST_NORM_ARCHITECTURES)
    for module in (
        "transformer_lens.components.transformer_block",  # 3.x
        "transformer_lens.utilities.architectures",  # 4.x
    ):
        try:
            names |= set(importlib.import_module(module).POST_NORM_ARCHITECTURES)
        except (ImportError, AttributeError):
            continue
    return tuple(sorted(names))


def new_kv_cache(model, batch_size: int = 1):
    """An empty TransformerLens key/value cache (one entry per block)."""
    check_stepwise_decoding(model)
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model_device(model), batch_size)


def cache_length(cache) -> int:
    """Positions held in ``cache`` (block 0's entry, which every step computes)."""
    return int(cache[0].past_keys.shape[1])


def embed_step(
    model, tokens: Int[Tensor, "batch pos"], cache
) -> tuple[Float[Tensor, "batch pos d_model"], Int[Tensor, "batch offset_pos"]]:
    """Embed new ``tokens`` after the positions in ``cache`` (no padding).

    Returns the residual stream entering block 0 and the attention mask over all positions
    (cache + new), which the blocks need. The cache's mask is extended once, here.
    """
    mask = torch.ones_like(tokens)
    residual, _, _, attention_mask = model.input_to_embed(
        tokens, attention_mask=mask, past_kv_cache=cache
    )
    return residual, attention_mask


def run_block(
    model,
    layer: int,
    resid: Float[Tensor, "batch pos d_model"],
    cache,
    attention_mask: Int[Tensor, "batch offset_pos"],
) -> Float[Tensor, "batch pos d_model"]:
    """Block ``layer`` on the new positions; appends their keys/values to ``cache[layer]``."""
    return model.blocks[layer](
        resid, past_kv_cache_entry=cache[layer], attention_mask=attention_mask
    )


def append_kv_from_resid(
    model,
    layer: int,
    resid_pre: Float[Tensor, "batch pos d_model"],
    cache,
    attention_mask: Int[Tensor, "batch offset_pos"],
    *,
    fast: bool = True,
) -> None:
    """Append to ``cache[layer]`` the keys/values block ``layer`` would compute from
    ``resid_pre`` (its input residual), without running the rest of the block.

    Fast path (plain pre-norm attention): ``ln1`` then the K and V projections only, the same
    ops TransformerLens' attention uses (keys are cached before rotary, as TL does). Other
    configurations (or ``fast=False``) run the block's attention on ``ln1(resid_pre)`` and
    discard its output.
    """
    block = model.blocks[layer]
    attn = block.attn
    cfg = model.cfg
    x = block.ln1(resid_pre)
    plain = fast and not (
        cfg.use_split_qkv_input
        or cfg.use_attn_in
        or getattr(cfg, "use_qk_norm", False)
        or getattr(cfg, "clip_qkv", None) is not None
        or getattr(cfg, "load_in_4bit", False)
        or getattr(cfg, "original_architecture", None)
        in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
    )
    if not plain:
        attn(
            query_input=x,
            key_input=x,
            value_input=x,
            past_kv_cache_entry=cache[layer],
            attention_mask=attention_mask,
        )
        return
    grouped = hasattr(attn, "_W_K") and not cfg.ungroup_grouped_query_attention
    w_k, b_k = (attn._W_K, attn._b_K) if grouped else (attn.W_K, attn.b_K)
    w_v, b_v = (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)
    k = _head_linear(x, w_k, b_k)
    v = _head_linear(x, w_v, b_v)
    cache[layer].append(k, v)


def _head_linear(
    x: Float[Tensor, "batch pos d_model"],
    w: Float[Tensor, "head d_model d_head"],
    b: Float[Tensor, "head d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """TransformerLens' ``simple_attn_linear``: one fused ``F.linear`` over all heads."""
    heads, d_model_, d_head = w.shape
    weight = w.permute(0, 2, 1).reshape(heads * d_head, d_model_)
    out = torch.nn.functional.linear(x, weight, b.reshape(heads * d_head))
    return out.reshape(x.shape[0], x.shape[1], heads, d_head)


def final_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """The model's own logits from the last block's output (final norm + unembedding)."""
    return unembed(model, final_norm(model, resid))


# --- task probes and interventions (issue 5, task: probes) ----------------------------------------


def run_forward(
    model,
    tokens: Int[Tensor, "batch pos"],
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    past_kv_cache=None,
) -> None:
    """One forward pass run only for its hooks (nothing returned, no logits computed).

    With ``past_kv_cache`` (see :func:`kv_cache`) the tokens continue the cached prefixes and
    the cache grows by them; ``attention_mask`` marks the real new tokens (default: all)."""
    if past_kv_cache is not None and attention_mask is None:
        attention_mask = torch.ones(tokens.shape, dtype=torch.long, device=tokens.device)
    extra = {} if past_kv_cache is None else {"past_kv_cache": past_kv_cache}
    with torch.no_grad():
        model(tokens, return_type=None, attention_mask=attention_mask, **extra)


def kv_cache(
    model,
    keys: list[Float[Tensor, "batch pos kv_heads d_head"]] | None = None,
    values: list[Float[Tensor, "batch pos kv_heads d_head"]] | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    batch_size: int = 1,
):
    """A TransformerLens key/value cache: empty, or holding the given per-layer (pre-rotary)
    keys and values of left-padded prefixes with their ``attention_mask`` (0 = padding).

    ``HookedTransformer`` only (see :func:`supports_tl_kv_cache`)."""
    if not supports_tl_kv_cache(model):
        raise NotImplementedError(
            "a TransformerLens key/value cache needs a HookedTransformer; a TransformerBridge "
            "(TransformerLens 4) uses Hugging Face's cache. Re-run without the cache "
            "(e.g. intervene(..., engine='full'))"
        )
    from transformer_lens import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(
        model.cfg, model_device(model), batch_size if keys is None else keys[0].shape[0]
    )
    if keys is not None:
        if values is None or attention_mask is None or len(keys) != n_layers(model):
            raise ValueError("give keys and values for every layer, and the attention mask")
        for entry, k, v in zip(cache.entries, keys, values, strict=True):
            entry.past_keys, entry.past_values = k, v
        cache.previous_attention_mask = attention_mask.to(torch.int)
    return cache


def kv_tensors(cache) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer ``[batch, pos, kv_heads, d_head]`` keys and values held by a cache."""
    return [e.past_keys for e in cache.entries], [e.past_values for e in cache.entries]


# ---------------------------------------------------------------------------------------------
# Issue 8 (refinement gap, sub-module replacement): sub-module hook names, caching arbitrary
# hooks, running from a layer's residual.
# ---------------------------------------------------------------------------------------------


# The sub-module hook names (``ln1.hook_normalized`` is the normalised vector *before* the
# norm's own affine weight, folded into the next matrices by ``fold_ln``, so the attention / MLP
# input is an affine function of it) live with the replacement hooks that use them.
def check_submodule_layout(model, kinds: tuple[str, ...] = SUBMODULE_KINDS) -> None:
    """Raise ``ValueError`` if the model's blocks do not have the layout the names above assume."""
    cfg = model.cfg
    problems = []
    if getattr(cfg, "use_attn_in", False) or getattr(cfg, "use_split_qkv_input", False):
        problems.append("use_attn_in / use_split_qkv_input give ln1 a head dimension")
    if getattr(cfg, "parallel_attn_mlp", False):
        problems.append("parallel attention/MLP blocks (GPT-J style) have no resid_mid")
    if cfg.normalization_type is None and any(k.startswith("norm") for k in kinds):
        problems.append("the model has no normalisation to replace")
    if getattr(cfg, "attn_only", False) and any(k in ("mlp", "norm2") for k in kinds):
        problems.append("an attention-only model has no MLP")
    if architecture(model) in _post_norm_architectures():
        problems.append(f"post-norm architecture {architecture(model)}")
    if problems:
        raise ValueError(
            "sub-module replacement expects pre-norm blocks with attention and MLP reading "
            "ln1/ln2 outputs; this model has: " + "; ".join(problems)
        )


def resid_pre_hook_name(layer: int) -> str:
    """``blocks.{layer}.hook_resid_pre``: the input of block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def run_with_activations(
    model,
    tokens: Int[Tensor, "batch pos"],
    names: list[str] | tuple[str, ...],
    *,
    return_logits: bool = False,
) -> tuple[Float[Tensor, "batch pos d_vocab"] | None, dict[str, Tensor]]:
    """Run once, caching only the hooks in ``names``; returns ``(logits or None, {name: act})``.

    A hook that fires several times in one pass (``ln1`` is called for queries, keys and values)
    keeps its last value.
    """
    wanted = set(names)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens,
            names_filter=lambda name: name in wanted,
            return_type="logits" if return_logits else None,
        )
        missing = wanted.difference(cache.keys())
        if missing:
            raise ValueError(f"these hooks did not fire: {sorted(missing)}")
        return logits, {name: cache[name] for name in names}


def run_from_layer(
    model,
    resid_pre: Float[Tensor, "batch pos d_model"],
    layer: int,
    fwd_hooks=(),
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of the model run from block ``layer`` on, given that block's input residual.

    Equivalent to the full run when ``resid_pre`` is the clean ``blocks.{layer}.hook_resid_pre``
    (no attention mask: right-padded batches only; rotary/absolute positions are unaffected).
    """
    if not 0 <= layer < n_layers(model):
        raise ValueError(f"layer must be in [0, {n_layers(model) - 1}], got {layer}")
    if getattr(model.cfg, "positional_embedding_type", "") == "shortformer":
        raise ValueError("running from a layer is not supported for shortformer positions")
    with torch.no_grad():
        return model.run_with_hooks(resid_pre, start_at_layer=layer, fwd_hooks=list(fwd_hooks))


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
