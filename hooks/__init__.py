"""TransformerLens hook-function factories for patching experiments.

Each factory returns ``fn(activation, hook) -> activation | None``, to be used as a
``(hook_name, fn)`` pair with ``model.run_with_hooks`` or ``with model.hooks(...)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

HookFn = Callable[[Tensor, object], "Tensor | None"]


def record(store: dict[str, Tensor], *, detach: bool = True) -> HookFn:
    """Save each activation under its hook name into ``store``.

    >>> store = {}
    >>> model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.hook_resid_post", record(store))])
    >>> store["blocks.3.hook_resid_post"].shape  # [batch, pos, d_model]
    """

    def hook_fn(activation: Tensor, hook) -> None:
        store[hook.name] = activation.detach().clone() if detach else activation

    return hook_fn


__all__ = ["HookFn", "record"]
