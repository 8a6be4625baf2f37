"""beyond-top1: how predictions form layer by layer, beyond the top-1 token.

A mechanistic-interpretability toolkit on TransformerLens: lenses (logit, linear-shortcut,
tuned), top-k saturation events, task-index probes, task-shift interventions and early exit.
"""

from beyond_top1.activations import ResidualBatch, stream_residuals
from beyond_top1.assets import AssetMissingError
from beyond_top1.data import load_texts, tokenize, wiki_texts
from beyond_top1.lenses import (
    Lens,
    LensFileError,
    LinearShortcutLens,
    LogitLens,
    load_lens,
    save_lens,
)
from beyond_top1.models import DEFAULT_MODEL, OFFLINE_MODELS, UnknownModelError, load_model
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "AssetMissingError",
    "Lens",
    "LensFileError",
    "LinearShortcutLens",
    "LogitLens",
    "Question",
    "ResidualBatch",
    "SubmoduleMaps",
    "UnknownModelError",
    "evaluate_replacements",
    "fit_submodule_maps",
    "format_top_tokens",
    "load_lens",
    "load_model",
    "load_questions",
    "load_texts",
    "make_questions",
    "read_questions",
    "refinement_table",
    "save_lens",
    "save_questions",
    "stream_residuals",
    "tokenize",
    "top_tokens",
    "wiki_texts",
]
