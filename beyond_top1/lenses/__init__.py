"""Lenses that read intermediate residual streams as next-token distributions."""

from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.io import (
    LENS_KINDS,
    LensFileError,
    check_lens_destination,
    load_lens,
    register_lens_kind,
    save_lens,
)
from beyond_top1.lenses.linear import LinearShortcutLens
from beyond_top1.lenses.logit import LogitLens
from beyond_top1.lenses.resolve import lens_set, resolve_lens
from beyond_top1.lenses.tuned import TunedLens, TunedLensTraining, train_tuned_lens
from beyond_top1.lenses.tuned_lens_format import TunedLensHashWarning

__all__ = [
    "LENS_KINDS",
    "Lens",
    "LensFileError",
    "check_lens_destination",
    "LinearShortcutLens",
    "LogitLens",
    "TunedLens",
    "TunedLensHashWarning",
    "TunedLensTraining",
    "load_lens",
    "register_lens_kind",
    "lens_set",
    "resolve_lens",
    "save_lens",
    "train_tuned_lens",
]
