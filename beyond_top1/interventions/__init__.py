"""Task-shift interventions (paper 001; docs/definitions.md, "Intervention").

Pairs of positions in one text (at most ``max_distance`` tokens apart) share their final top-1
token, but the *source* fixes it at least ``delta`` layers before the *target*, and comes
**strictly before** it in the text (``direction="forward"``; a later source would inject context
the target cannot see, so ``"backward"`` pairs are only ever reported on their own). For an
offset ``d`` the source's ``resid_post`` at layer ``l = s_src + d`` is copied into the target's
``resid_post`` at the same layer, with a hook on ``blocks.{l}.hook_resid_post`` that replaces
**only the target position** (:func:`hooks.copy_positions`; the public code of 001 replaced a
whole block's output for every position). The model then runs on and the target's ``s_1`` is
recomputed under the lens from its residuals at every layer. Success: the final top-1 is
unchanged and the new ``s_1 <= l``; strict success: new ``s_1 == l``.

Controls that can succeed (each trial kind is a row of the trial table):

* ``matched``: a donor position of the same text, before the target, whose lens top-1 at
  layer ``l`` is the source's lens top-1 at ``l`` but which has not saturated yet
  (``s_1 > l``): the same content as the real patch, another task state.
* ``random``: the same-layer state of a random other position of the same text (any top-1).

``own`` (the target's own state copied into itself) is an exact no-op that gives each pair's
unpatched baseline in the same batch layout; it cannot succeed when ``l < s_tgt`` and is never
reported as a control. With a task probe fitted on *other* texts (checked), the probe's
predicted task after ``l`` is compared before and after the patch (did it move from 1 to 2?).

Patched runs are batched: one patch per batch row, many pairs and offsets per forward pass.

Modules: :mod:`.pairs` (which pairs), :mod:`.patching` (the patched forward passes),
:mod:`.run` (:func:`intervene`), :mod:`.result` (rates and files).
"""

from beyond_top1.interventions.pairs import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MAX_PAIRS,
    DIRECTIONS,
    default_delta,
    default_offset_range,
    find_pairs,
)
from beyond_top1.interventions.patching import (
    TextStates,
    patch_and_read,
    patch_and_read_cached,
    text_states,
)
from beyond_top1.interventions.result import (
    CONTROLS,
    KINDS,
    SUMMARY_COLUMNS,
    InterventionResult,
    load_interventions,
)
from beyond_top1.interventions.run import intervene

__all__ = [
    "CONTROLS",
    "DEFAULT_MAX_DISTANCE",
    "DEFAULT_MAX_PAIRS",
    "DIRECTIONS",
    "KINDS",
    "SUMMARY_COLUMNS",
    "InterventionResult",
    "TextStates",
    "default_delta",
    "default_offset_range",
    "find_pairs",
    "intervene",
    "load_interventions",
    "patch_and_read",
    "patch_and_read_cached",
    "text_states",
]
