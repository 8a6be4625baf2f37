"""TransformerLens hook-function factories for patching experiments.

Each factory returns ``fn(activation, hook) -> activation | None``, to be used as a
``(hook_name, fn)`` pair with ``model.run_with_hooks`` or ``with model.hooks(...)`` (or
:func:`patched`, which checks the names first). Factories that change an activation return a
new tensor and never write into the one they receive, so a ``record`` or ``run_with_cache``
hook on the same point keeps what it saw.

Positions index axis 1 of ``[batch, pos, ...]`` activations: an int means that position in
every batch row, ``(batch_idx, pos)`` one row; negative values count from the end.

>>> from hooks import copy_position, patched, record
>>> store = {}
>>> with patched(model, [("blocks.12.hook_resid_post", copy_position(source=5, target=17)),
...                      ("blocks.29.hook_resid_post", record(store))]):
...     logits = model(tokens)
"""

from hooks._common import HookFn
from hooks.ablate import mean_ablate, mean_activation, mean_from_stream, zero_ablate
from hooks.compose import HookNameError, check_hook_names, fwd_hooks, patched
from hooks.patch import copy_position, copy_positions, replace_at_positions
from hooks.record import record, record_positions
from hooks.steer import add_vector

__all__ = [
    "HookFn",
    "HookNameError",
    "add_vector",
    "check_hook_names",
    "copy_position",
    "copy_positions",
    "fwd_hooks",
    "mean_ablate",
    "mean_activation",
    "mean_from_stream",
    "patched",
    "record",
    "record_positions",
    "replace_at_positions",
    "zero_ablate",
]
