"""beyond-top1: how predictions form layer by layer, beyond the top-1 token.

A mechanistic-interpretability toolkit on TransformerLens: lenses (logit, linear-shortcut,
tuned), top-k saturation events, task-index probes, task-shift interventions and early exit.

The top level holds the verbs and result types a session uses; the rest lives in namespaces:
``bt.lenses``, ``bt.stats`` (saturation and ordering statistics), ``bt.plot`` (matplotlib
figures), ``bt.views`` (CircuitsVis views), ``bt.hooks`` (TransformerLens hook factories, also
importable as the top-level ``hooks``), ``bt.tasks`` (each analysis as a config and a run, as the
CLI and ``reproduce`` use them) and ``bt.errors``. Names load on first use, so ``import
beyond_top1`` is quick and ``import beyond_top1.hooks`` pulls in nothing else.
"""

from __future__ import annotations

import importlib
import warnings

__version__ = "0.1.0"

# name -> module that defines it
_PUBLIC = {
    # models and data
    "load_model": "beyond_top1.models",
    "wiki_texts": "beyond_top1.data",
    "load_texts": "beyond_top1.data",
    "tokenize": "beyond_top1.data",
    "stream_residuals": "beyond_top1.activations",
    # lenses
    "LogitLens": "beyond_top1.lenses",
    "LinearShortcutLens": "beyond_top1.lenses",
    "TunedLens": "beyond_top1.lenses",
    "load_lens": "beyond_top1.lenses",
    "evaluate_lenses": "beyond_top1.lenses.metrics",
    # prompts
    "top_tokens": "beyond_top1.prompt",
    "trajectory": "beyond_top1.prompt",
    "Trajectory": "beyond_top1.prompt",
    "TrajectoryBatch": "beyond_top1.prompt",
    # a corpus
    "scan": "beyond_top1.scans",
    "load_scan": "beyond_top1.scans",
    "ScanResult": "beyond_top1.scans",
    "ordering": "beyond_top1.saturation",
    "OrderingStats": "beyond_top1.saturation",
    # probes and interventions
    "task_dataset": "beyond_top1.probes",
    "TaskProbe": "beyond_top1.probes",
    "cross_validate_task_probe": "beyond_top1.probes",
    "load_probe": "beyond_top1.probes",
    "find_pairs": "beyond_top1.interventions",
    "intervene": "beyond_top1.interventions",
    # early exit
    "collect_exit_signals": "beyond_top1.early_exit",
    "simulate_exit": "beyond_top1.early_exit",
    "early_exit_curves": "beyond_top1.early_exit",
    "generate_early_exit": "beyond_top1.early_exit",
    # refinement gap and sub-module replacement
    "refinement_table": "beyond_top1.refinement",
    "SubmoduleMaps": "beyond_top1.replacement",
    "evaluate_replacements": "beyond_top1.replacement",
    # views, and a helper
    "View": "beyond_top1.viz",
    "trajectory_view": "beyond_top1.viz",
    "threads": "beyond_top1.runtime",
}
_NAMESPACES = {
    "lenses": "beyond_top1.lenses",
    "stats": "beyond_top1.stats",
    "plot": "beyond_top1.figures",
    "views": "beyond_top1.viz",
    "hooks": "beyond_top1.hooks",
    "tasks": "beyond_top1.tasks",
    "errors": "beyond_top1.errors",
}
# Old top-level names, kept for one release: name -> (module, attribute, where it lives now).
_MOVED = {
    "saturation_layers": ("beyond_top1.stats", "saturation_layers", "bt.stats"),
    "kendall_tau_strict": ("beyond_top1.stats", "kendall_tau_strict", "bt.stats"),
    "position_filter": ("beyond_top1.stats", "position_filter", "bt.stats"),
    "task_labels": ("beyond_top1.stats", "task_labels", "bt.stats"),
    "lens_topk": ("beyond_top1.ranking", "lens_topk", "beyond_top1.ranking (a kernel)"),
    "TopKReadout": ("beyond_top1.ranking", "TopKReadout", "beyond_top1.ranking (a kernel)"),
    "colored_tokens": ("beyond_top1.viz", "colored_tokens", "bt.views"),
    "colored_tokens_multi": ("beyond_top1.viz", "colored_tokens_multi", "bt.views"),
    "compare_lenses": ("beyond_top1.viz", "compare_lenses", "bt.views"),
    "side_by_side": ("beyond_top1.viz", "side_by_side", "bt.views"),
    "token_log_probs": ("beyond_top1.viz", "token_log_probs", "bt.views"),
    "topk_grid": ("beyond_top1.viz", "topk_grid", "bt.views"),
    "topk_tokens": ("beyond_top1.viz", "topk_tokens", "bt.views"),
    "format_top_tokens": ("beyond_top1.prompt", "format_top_tokens", "beyond_top1.prompt"),
    "save_lens": ("beyond_top1.lenses", "save_lens", "lens.save(path)"),
    "train_tuned_lens": ("beyond_top1.lenses", "train_tuned_lens", "bt.TunedLens.fit"),
    "TunedLensTraining": ("beyond_top1.lenses", "TunedLensTraining", "bt.lenses"),
    "Lens": ("beyond_top1.lenses", "Lens", "bt.lenses"),
    "quality_of_fit_matrix": (
        "beyond_top1.lenses.metrics",
        "quality_of_fit_matrix",
        "beyond_top1.lenses.metrics",
    ),
    "save_scan": ("beyond_top1.scans", "save_scan", "scan.save(path)"),
    "ResidualBatch": ("beyond_top1.activations", "ResidualBatch", "beyond_top1.activations"),
    "TaskDataset": ("beyond_top1.probes", "TaskDataset", "beyond_top1.probes"),
    "ProbeCV": ("beyond_top1.probes", "ProbeCV", "beyond_top1.probes"),
    "InterventionResult": ("beyond_top1.interventions", "InterventionResult", "bt.intervene"),
    "ExitSignals": ("beyond_top1.early_exit", "ExitSignals", "beyond_top1.early_exit"),
    "ExitResult": ("beyond_top1.early_exit", "ExitResult", "beyond_top1.early_exit"),
    "BetterLMResult": ("beyond_top1.early_exit", "BetterLMResult", "beyond_top1.early_exit"),
    "load_exit_signals": ("beyond_top1.early_exit", "load_exit_signals", "beyond_top1.early_exit"),
    "layers_saved_table": (
        "beyond_top1.early_exit",
        "layers_saved_table",
        "beyond_top1.early_exit",
    ),
    "better_language_modeling": (
        "beyond_top1.early_exit",
        "better_language_modeling",
        "beyond_top1.early_exit",
    ),
    "GenerationBenchmark": (
        "beyond_top1.early_exit",
        "GenerationBenchmark",
        "beyond_top1.early_exit",
    ),
    "benchmark_early_exit": (
        "beyond_top1.early_exit",
        "benchmark_early_exit",
        "beyond_top1.early_exit",
    ),
    "fit_submodule_maps": (
        "beyond_top1.replacement",
        "fit_submodule_maps",
        "bt.SubmoduleMaps.fit",
    ),
    "Question": ("beyond_top1.refinement", "Question", "beyond_top1.refinement"),
    "make_questions": ("beyond_top1.refinement", "make_questions", "beyond_top1.refinement"),
    "read_questions": ("beyond_top1.refinement", "read_questions", "beyond_top1.refinement"),
    "load_questions": ("beyond_top1.refinement", "load_questions", "beyond_top1.refinement"),
    "save_questions": ("beyond_top1.refinement", "save_questions", "beyond_top1.refinement"),
    "DEFAULT_MODEL": ("beyond_top1.models", "DEFAULT_MODEL", "beyond_top1.models"),
    "OFFLINE_MODELS": ("beyond_top1.models", "OFFLINE_MODELS", "beyond_top1.models"),
    "UnknownModelError": ("beyond_top1.errors", "UnknownModelError", "bt.errors"),
    "AssetMissingError": ("beyond_top1.errors", "AssetMissingError", "bt.errors"),
    "LensFileError": ("beyond_top1.errors", "LensFileError", "bt.errors"),
    "ScanFileError": ("beyond_top1.errors", "ScanFileError", "bt.errors"),
    "ProbeFileError": ("beyond_top1.errors", "ProbeFileError", "bt.errors"),
}

_WARN_WHEN_CALLED = {"train_tuned_lens", "fit_submodule_maps"}

__all__ = sorted([*_PUBLIC, *_NAMESPACES])


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _NAMESPACES:
        value = importlib.import_module(_NAMESPACES[name])
    elif name in _MOVED:
        module, attribute, where = _MOVED[name]
        if name in _WARN_WHEN_CALLED:  # the function warns itself: one warning, not two
            return getattr(importlib.import_module(module), attribute)
        warnings.warn(
            f"bt.{name} moved to {where}; the top-level name goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attribute)
    else:
        try:  # a submodule, e.g. bt.activations
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
