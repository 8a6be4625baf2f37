"""Hook factories that replace a sub-module's output by a function of its input (004 §6).

A sub-module's input and output are read at two hook points of the same forward pass. A
*stateful pair* captures the input at the first hook and replaces the output at the second::

    fwd_hooks = linear_replacement(
        "blocks.5.ln1.hook_normalized",    # input of attention (before ln1's affine weight)
        "blocks.5.hook_attn_out",          # what attention adds to the residual stream
        weight, bias,                      # [d_in, d_out], [d_out]: out = in @ weight + bias
    )
    logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)

Because a replacement by a function of another hook's input needs two hook points, these
factories return a list of ``(hook_name, fn)`` pairs and their names end in ``_hooks``;
:func:`replace_with_constant` needs one point and returns one hook function.

Hook names of the sub-modules of block ``l`` (TransformerLens 3.9 ``HookedTransformer``; the same
for RMSNorm models such as SmolLM2, whose folded norms are ``RMSPre``, and for LayerNorm models
such as GPT-2; :func:`submodule_hook_names`):

========  =================================  =================================
kind      input hook                         output hook
========  =================================  =================================
attn      ``blocks.{l}.ln1.hook_normalized``  ``blocks.{l}.hook_attn_out``
mlp       ``blocks.{l}.ln2.hook_normalized``  ``blocks.{l}.hook_mlp_out``
norm      ``blocks.{l}.hook_resid_pre``       ``blocks.{l}.ln1.hook_normalized``
norm2     ``blocks.{l}.hook_resid_mid``       ``blocks.{l}.ln2.hook_normalized``
========  =================================  =================================

``ln1.hook_normalized`` is the normalised vector *before* the norm's affine weight and bias (for
unfolded LayerNorm models), so the attention's real input is an affine function of it and a
linear map of it is still a linear map of the attention's input. ``ln1`` runs once for each of
the query, key and value inputs, so its hooks fire three times per pass with the same values:
capturing keeps the last one, replacing replaces all three (the whole norm is replaced).

"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1.hooks._common import HookFn

FwdHooks = list[tuple[str, HookFn]]


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    out = x if weight is None else x @ weight.to(x.device, x.dtype)
    return out if bias is None else out + bias.to(x.device, x.dtype)


SUBMODULE_KINDS = ("attn", "mlp", "norm", "norm2")
_SUBMODULE_HOOKS = {
    "attn": ("blocks.{layer}.ln1.hook_normalized", "blocks.{layer}.hook_attn_out"),
    "mlp": ("blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"),
    "norm": ("blocks.{layer}.hook_resid_pre", "blocks.{layer}.ln1.hook_normalized"),
    "norm2": ("blocks.{layer}.hook_resid_mid", "blocks.{layer}.ln2.hook_normalized"),
}


def submodule_hook_names(layer: int, kind: str) -> tuple[str, str]:
    """``(input_hook, output_hook)`` of sub-module ``kind`` of block ``layer`` (the table)."""
    if kind not in _SUBMODULE_HOOKS:
        raise ValueError(f"kind must be one of {SUBMODULE_KINDS}, got {kind!r}")
    source, target = _SUBMODULE_HOOKS[kind]
    return source.format(layer=layer), target.format(layer=layer)


def linear_replacement_hooks(
    input_hook: str,
    output_hook: str,
    weight: Float[Tensor, "d_in d_out"] | None = None,
    bias: Float[Tensor, " d_out"] | None = None,
) -> FwdHooks:
    """Replace the activation at ``output_hook`` by ``input @ weight + bias``.

    ``input`` is the activation at ``input_hook`` in the same pass (it must fire first).
    ``weight=None`` is the identity (then ``d_in`` must equal ``d_out``); ``bias=None`` adds
    nothing. With ``input_hook == output_hook`` the map is applied to the activation itself.
    """
    if weight is not None and weight.ndim != 2:
        raise ValueError(f"weight must be [d_in, d_out], got shape {tuple(weight.shape)}")
    if input_hook == output_hook:

        def apply_in_place(activation: Tensor, hook) -> Tensor:
            return _affine(activation, weight, bias)

        return [(output_hook, apply_in_place)]

    captured: dict[str, Tensor] = {}

    def capture(activation: Tensor, hook) -> None:
        captured["input"] = activation

    def replace(activation: Tensor, hook) -> Tensor:
        if "input" not in captured:
            raise RuntimeError(
                f"{output_hook} fired before {input_hook}: the input hook must run earlier in "
                "the same forward pass"
            )
        x = captured["input"]
        if x.shape[:-1] != activation.shape[:-1]:
            raise RuntimeError(
                f"{input_hook} has shape {tuple(x.shape)} but {output_hook} has "
                f"{tuple(activation.shape)}: they must agree except in the last dimension"
            )
        out = _affine(x, weight, bias)
        if out.shape != activation.shape:
            raise RuntimeError(
                f"the map gives shape {tuple(out.shape)} for {output_hook}, which has "
                f"{tuple(activation.shape)}"
            )
        return out

    return [(input_hook, capture), (output_hook, replace)]


def replace_with_constant(value: Float[Tensor, " d"] | float = 0.0) -> HookFn:
    """Replace the activation by a constant vector (``0.0``: drop the sub-module's output).

    >>> logits = model.run_with_hooks(tokens, fwd_hooks=[
    ...     ("blocks.5.hook_attn_out", replace_with_constant(0.0)),
    ... ])
    """

    def replace(activation: Tensor, hook) -> Tensor:
        fill = torch.as_tensor(value, device=activation.device, dtype=activation.dtype)
        return fill.expand_as(activation).clone()

    return replace


def submodule_replacement_hooks(
    layer: int,
    kind: str,
    weight: Float[Tensor, "d_in d_out"] | None = None,
    bias: Float[Tensor, " d_out"] | None = None,
) -> FwdHooks:
    """:func:`linear_replacement_hooks` for sub-module ``kind`` (``attn``, ``mlp``, ``norm``,
    ``norm2``) of block ``layer``, with the hook names of the table above."""
    return linear_replacement_hooks(*submodule_hook_names(layer, kind), weight, bias)


def _renamed(old: str, new: str) -> None:
    warnings.warn(
        f"hooks.{old} is renamed {new} (it returns a list of (name, fn) pairs); the old name "
        "goes away in the next release",
        DeprecationWarning,
        stacklevel=3,
    )


def linear_replacement(input_hook, output_hook, weight=None, bias=None) -> FwdHooks:
    """Deprecated name of :func:`linear_replacement_hooks`."""
    _renamed("linear_replacement", "linear_replacement_hooks")
    return linear_replacement_hooks(input_hook, output_hook, weight, bias)


def submodule_replacement(layer, kind, weight=None, bias=None) -> FwdHooks:
    """Deprecated name of :func:`submodule_replacement_hooks`."""
    _renamed("submodule_replacement", "submodule_replacement_hooks")
    return submodule_replacement_hooks(layer, kind, weight, bias)


def constant_replacement(output_hook: str, value=0.0) -> FwdHooks:
    """Deprecated: ``[(output_hook, replace_with_constant(value))]``."""
    _renamed("constant_replacement", "[(name, replace_with_constant(value))]")
    return [(output_hook, replace_with_constant(value))]


__all__ = [
    "SUBMODULE_KINDS",
    "constant_replacement",
    "linear_replacement",
    "linear_replacement_hooks",
    "replace_with_constant",
    "submodule_hook_names",
    "submodule_replacement",
    "submodule_replacement_hooks",
]
