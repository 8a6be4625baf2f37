"""Deprecated: the early-exit decoder moved to :mod:`beyond_top1.early_exit` (its criteria
share the simulation's names). This module re-exports it for one release."""

import warnings

from beyond_top1.early_exit.decoder import *  # noqa: F403
from beyond_top1.early_exit.decoder import __all__  # noqa: F401

warnings.warn(
    "beyond_top1.generation moved to beyond_top1.early_exit; the old module goes away in the "
    "next release",
    DeprecationWarning,
    stacklevel=2,
)
