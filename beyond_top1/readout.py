"""Deprecated: moved to :mod:`beyond_top1.prompt`. This module re-exports it for one release."""

import warnings

from beyond_top1.prompt import *  # noqa: F403
from beyond_top1.prompt import __all__  # noqa: F401

warnings.warn(
    "beyond_top1.readout moved to beyond_top1.prompt; the old module goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
