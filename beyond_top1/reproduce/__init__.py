"""One command that runs every analysis as a cached, resumable stage and writes a report.

:func:`reproduce` (CLI: ``beyond-top1 reproduce --model M --scale quick|paper --out DIR``) is the
dependency graph of the tasks of :mod:`beyond_top1.tasks`, and nothing else: each stage runs one
task into ``DIR/stages/<name>/``, with a typed config made from the :class:`Scale`:

==================  ===========================================================================
``lens-linear``     :mod:`~beyond_top1.tasks.lens_fit`: the linear-shortcut lens (004's ``mat``)
``lens-tuned``      :mod:`~beyond_top1.tasks.lens_fit`: a tuned lens (paper scale; optional)
``lens-metrics``    :mod:`~beyond_top1.tasks.lens_eval`: r², Precision@k, surprisal, KL, CE
``scan-<model>``    :mod:`~beyond_top1.tasks.scan` of the model and each untrained twin
``ordering``        :mod:`~beyond_top1.tasks.ordering`: 001's statistics side by side
``probe-<model>``   :mod:`~beyond_top1.tasks.probe`: cross-validated task probe (+ held-out one)
``interventions``   :mod:`~beyond_top1.tasks.interventions` on the second half of the texts
``early-exit``      :mod:`~beyond_top1.tasks.early_exit`: the simulation on later texts
``generation``      :mod:`~beyond_top1.tasks.generation` with the simulation's best criterion
``refinement``      :mod:`~beyond_top1.tasks.refinement` (paper scale / optional)
``replacement``     :mod:`~beyond_top1.tasks.replacement` (paper scale / optional)
``views``           :mod:`~beyond_top1.tasks.views`: CircuitsVis views of two prompts
==================  ===========================================================================

Modules: :mod:`.scale` (the named scales), :mod:`.graph` (the stages and what each reads),
:mod:`.run` (:func:`reproduce`, ``metrics.json``), :mod:`.report` (``report.html``).

The run then writes ``DIR/report.html`` (self-contained, offline; every section reads its
task's files through the task's loader) and ``DIR/metrics.json`` (each task's headline, its
settings, timings and package versions). A stage that finished with the same config, model
and upstream stages is skipped; changing one reruns it and every stage after it that depends
on it; an interrupted scan continues from its last shard.
"""

from beyond_top1.reproduce.graph import GENERATION_PROMPT, PROMPTS, default_twins, slug
from beyond_top1.reproduce.report import build_report, rebuild_report
from beyond_top1.reproduce.run import Reproduction, headline, load_metrics, reproduce
from beyond_top1.reproduce.scale import SCALES, Scale, parse_override, resolve_scale

__all__ = [
    "GENERATION_PROMPT",
    "PROMPTS",
    "SCALES",
    "Reproduction",
    "Scale",
    "build_report",
    "default_twins",
    "headline",
    "load_metrics",
    "parse_override",
    "rebuild_report",
    "reproduce",
    "resolve_scale",
    "slug",
]
