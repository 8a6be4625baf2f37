"""beyond-top1: how predictions form layer by layer, beyond the top-1 token.

A mechanistic-interpretability toolkit on TransformerLens: lenses (logit, linear-shortcut,
tuned), top-k saturation events, task-index probes, task-shift interventions and early exit.
"""

from beyond_top1.activations import ResidualBatch, stream_residuals
from beyond_top1.assets import AssetMissingError
from beyond_top1.data import load_texts, tokenize, wiki_texts
from beyond_top1.early_exit import (
    BetterLMResult,
    ExitResult,
    ExitSignals,
    better_language_modeling,
    collect_exit_signals,
    early_exit_curves,
    layers_saved_table,
    load_exit_signals,
    simulate_exit,
)
from beyond_top1.generation import GenerationBenchmark, benchmark_early_exit, generate_early_exit
from beyond_top1.interventions import InterventionResult, find_pairs, intervene
from beyond_top1.lenses import (
    Lens,
    LensFileError,
    LinearShortcutLens,
    LogitLens,
    TunedLens,
    TunedLensTraining,
    load_lens,
    save_lens,
    train_tuned_lens,
)
from beyond_top1.lenses.metrics import evaluate_lenses, quality_of_fit_matrix
from beyond_top1.models import DEFAULT_MODEL, OFFLINE_MODELS, UnknownModelError, load_model
from beyond_top1.probes import (
    ProbeCV,
    ProbeFileError,
    TaskDataset,
    TaskProbe,
    cross_validate_task_probe,
    load_probe,
    task_dataset,
    task_labels,
)
from beyond_top1.ranking import TopKReadout, lens_topk
from beyond_top1.readout import format_top_tokens, top_tokens
from beyond_top1.refinement import (
    Question,
    load_questions,
    make_questions,
    read_questions,
    refinement_table,
    save_questions,
)
from beyond_top1.replacement import SubmoduleMaps, evaluate_replacements, fit_submodule_maps
from beyond_top1.saturation import (
    OrderingStats,
    kendall_tau_strict,
    ordering,
    position_filter,
    saturation_layers,
)
from beyond_top1.scans import ScanFileError, ScanResult, load_scan, save_scan, scan
from beyond_top1.trajectory import Trajectory, trajectory
from beyond_top1.viz import (
    View,
    colored_tokens,
    colored_tokens_multi,
    compare_lenses,
    side_by_side,
    token_log_probs,
    topk_grid,
    topk_tokens,
    trajectory_view,
)

__version__ = "0.1.0"

__all__ = [
    "AssetMissingError",
    "BetterLMResult",
    "DEFAULT_MODEL",
    "ExitResult",
    "ExitSignals",
    "GenerationBenchmark",
    "InterventionResult",
    "Lens",
    "LensFileError",
    "LinearShortcutLens",
    "LogitLens",
    "OFFLINE_MODELS",
    "OrderingStats",
    "ProbeCV",
    "ProbeFileError",
    "Question",
    "ResidualBatch",
    "ScanFileError",
    "ScanResult",
    "SubmoduleMaps",
    "TaskDataset",
    "TaskProbe",
    "TopKReadout",
    "Trajectory",
    "TunedLens",
    "TunedLensTraining",
    "UnknownModelError",
    "View",
    "benchmark_early_exit",
    "better_language_modeling",
    "collect_exit_signals",
    "colored_tokens",
    "colored_tokens_multi",
    "compare_lenses",
    "cross_validate_task_probe",
    "early_exit_curves",
    "evaluate_lenses",
    "evaluate_replacements",
    "find_pairs",
    "fit_submodule_maps",
    "format_top_tokens",
    "generate_early_exit",
    "intervene",
    "kendall_tau_strict",
    "layers_saved_table",
    "lens_topk",
    "load_exit_signals",
    "load_lens",
    "load_model",
    "load_probe",
    "load_questions",
    "load_scan",
    "load_texts",
    "make_questions",
    "ordering",
    "position_filter",
    "quality_of_fit_matrix",
    "read_questions",
    "refinement_table",
    "saturation_layers",
    "save_lens",
    "save_questions",
    "save_scan",
    "scan",
    "side_by_side",
    "simulate_exit",
    "stream_residuals",
    "task_dataset",
    "task_labels",
    "token_log_probs",
    "tokenize",
    "top_tokens",
    "topk_grid",
    "topk_tokens",
    "train_tuned_lens",
    "trajectory",
    "trajectory_view",
    "wiki_texts",
]
