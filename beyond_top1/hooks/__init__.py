"""TransformerLens hook-function factories for patching experiments.

Each factory returns ``fn(activation, hook) -> activation | None``, to be used as a
``(hook_name, fn)`` pair with ``model.run_with_hooks`` or ``with model.hooks(...)`` (or
:func:`patched`, which checks the names first). Factories that change an activation return a
new tensor and never write into the one they receive, so a ``record`` or ``run_with_cache``
hook on the same point keeps what it saw. The ``*_hooks`` factories, whose replacement reads a
second hook point, return a list of ``(hook_name, fn)`` pairs instead.

Positions index axis 1 of ``[batch, pos, ...]`` activations: an int means that position in
every batch row, ``(batch_idx, pos)`` one row; negative values count from the end.

This package imports nothing else from the toolkit (only torch and jaxtyping); the top-level
``hooks`` package re-exports it.

>>> from beyond_top1.hooks import copy_position, patched, record   # or: from hooks import ...
>>> store = {}
>>> with patched(model, [("blocks.12.hook_resid_post", copy_position(source=5, target=17)),
...                      ("blocks.29.hook_resid_post", record(store))]):
...     logits = model(tokens)
"""

from beyond_top1.hooks._common import HookFn
from beyond_top1.hooks.ablate import mean_ablate, zero_ablate
from beyond_top1.hooks.compose import HookNameError, check_hook_names, fwd_hooks, patched
from beyond_top1.hooks.patch import copy_position, copy_positions, replace_at_positions
from beyond_top1.hooks.record import record, record_positions
from beyond_top1.hooks.replace import (  # noqa: F401 - *_replacement: deprecated, warn on call
    SUBMODULE_KINDS,
    constant_replacement,
    linear_replacement,
    linear_replacement_hooks,
    replace_with_constant,
    submodule_hook_names,
    submodule_replacement,
    submodule_replacement_hooks,
)
from beyond_top1.hooks.steer import add_vector

__all__ = [
    "HookFn",
    "HookNameError",
    "SUBMODULE_KINDS",
    "add_vector",
    "check_hook_names",
    "copy_position",
    "copy_positions",
    "fwd_hooks",
    "linear_replacement_hooks",
    "mean_ablate",
    "patched",
    "record",
    "record_positions",
    "replace_at_positions",
    "replace_with_constant",
    "submodule_hook_names",
    "submodule_replacement_hooks",
    "zero_ablate",
]
