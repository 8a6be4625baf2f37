"""Tasks: every analysis as one typed config, one ``run`` that writes its files, a ``load``
that reads them back and a ``headline`` of the numbers worth reporting.

The CLI subcommands, the stages of ``reproduce`` and the ``experiments/`` scripts all call
these; nothing else wires an analysis together. Each module names its files in one place.

==================  ==========================================================================
:mod:`.lens_fit`    fit a linear-shortcut or tuned lens and save it
:mod:`.lens_eval`   per-layer metrics of lenses (and the layer × layer quality-of-fit map)
:mod:`.scan`        a saturation scan of a corpus (resumable)
:mod:`.ordering`    001's ordering statistics of several scans, with both permutation nulls
:mod:`.probe`       a task-index probe, cross-validated by text, fitted and saved
:mod:`.interventions` task-shift interventions with their controls
:mod:`.early_exit`  simulated early exit: curves, layers saved, the better-LM test
:mod:`.generation`  the real early-exit decoder against full greedy decoding
:mod:`.refinement`  003's refinement gap against the relevant document's position
:mod:`.replacement` 004's sub-module linear replacement
:mod:`.views`       CircuitsVis views of prompts
==================  ==========================================================================

Shared: :class:`~.texts.TextSpec` (which texts, as a value) and :mod:`.common`
(:class:`~.common.AnalysisUnavailable`, figures).

>>> from beyond_top1.tasks import probe
>>> outcome = probe.run(model, probe.ProbeConfig(n_tasks=3), "runs/probe", scan)
>>> probe.headline(outcome)["balanced_accuracy_mean"]
"""

import importlib

from beyond_top1.tasks.common import AnalysisUnavailable
from beyond_top1.tasks.texts import TextSpec

_TASKS = (
    "early_exit",
    "generation",
    "interventions",
    "lens_eval",
    "lens_fit",
    "ordering",
    "probe",
    "refinement",
    "replacement",
    "scan",
    "views",
)
__all__ = ["AnalysisUnavailable", "TextSpec", *_TASKS]


def __getattr__(name: str):
    """The task modules load when first used, so that importing one of them (or
    :class:`AnalysisUnavailable`) does not import every analysis."""
    if name in _TASKS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
