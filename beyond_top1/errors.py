"""Every error the toolkit raises on purpose, in one namespace (``bt.errors``).

Each is a ``ValueError`` (a missing asset package: a ``RuntimeError``) whose message
says what is wrong and what to do.
"""

from beyond_top1.assets import AssetMissingError
from beyond_top1.fileio import FolderBusyError, OutputError
from beyond_top1.hooks import HookNameError
from beyond_top1.lenses import LensFileError
from beyond_top1.models import UnknownModelError
from beyond_top1.probes import ProbeFileError
from beyond_top1.scans import ScanFileError

__all__ = [
    "AssetMissingError",
    "FolderBusyError",
    "HookNameError",
    "LensFileError",
    "OutputError",
    "ProbeFileError",
    "ScanFileError",
    "UnknownModelError",
]
