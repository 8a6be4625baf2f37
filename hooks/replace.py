"""Hook factories that replace a sub-module's output by a function of its input (004 §6).

A sub-module's input and output are read at two hook points of the same forward pass. A
*stateful pair* captures the input at the first hook and replaces the output at the second::

    fwd_hooks = linear_replacement(
        "blocks.5.ln1.hook_normalized",    # input of attention (before ln1's affine weight)
        "blocks.5.hook_attn_out",          # what attention adds to the residual stream
        weight, bias,                      # [d_in, d_out], [d_out]: out = in @ weight + bias
    )
    logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)

Hook names of the sub-modules of block ``l`` (TransformerLens 3.9 ``HookedTransformer``; the same
for RMSNorm models such as SmolLM2, whose folded norms are ``RMSPre``, and for LayerNorm models
such as GPT-2; see ``beyond_top1.hooked.submodule_hook_names``):

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

Each factory returns a list of ``(hook_name, fn)`` pairs for ``fwd_hooks``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

HookFn = Callable[[Tensor, object], "Tensor | None"]
FwdHooks = list[tuple[str, HookFn]]


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    out = x if weight is None else x @ weight.to(x.device, x.dtype)
    return out if bias is None else out + bias.to(x.device, x.dtype)


def linear_replacement(
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


def constant_replacement(output_hook: str, value: Float[Tensor, " d"] | float = 0.0) -> FwdHooks:
    """Replace the activation at ``output_hook`` by a constant vector (``0.0``: drop it)."""

    def replace(activation: Tensor, hook) -> Tensor:
        fill = torch.as_tensor(value, device=activation.device, dtype=activation.dtype)
        return fill.expand_as(activation).clone()

    return [(output_hook, replace)]


def submodule_replacement(
    layer: int,
    kind: str,
    weight: Float[Tensor, "d_in d_out"] | None = None,
    bias: Float[Tensor, " d_out"] | None = None,
) -> FwdHooks:
    """:func:`linear_replacement` for sub-module ``kind`` (``attn``, ``mlp``, ``norm``,
    ``norm2``) of block ``layer``, with the hook names of the table above."""
    from beyond_top1.hooked import submodule_hook_names

    return linear_replacement(*submodule_hook_names(layer, kind), weight, bias)


__all__ = [
    "constant_replacement",
    "linear_replacement",
    "submodule_replacement",
]
