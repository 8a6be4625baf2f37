"""Deprecated: moved to :mod:`beyond_top1.reproduce.report`; re-exported for one release."""

import warnings

from beyond_top1.reproduce.report import *  # noqa: F403
from beyond_top1.reproduce.report import __all__  # noqa: F401

warnings.warn(
    "beyond_top1.reproduce_report moved to beyond_top1.reproduce.report; the old module goes "
    "away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
