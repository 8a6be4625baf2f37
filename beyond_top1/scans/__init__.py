"""Rank trajectories and saturation events over a corpus, streamed (000/001; see
docs/definitions.md): the one scan loop (:mod:`~beyond_top1.scans.run`), what it keeps
(:mod:`~beyond_top1.scans.result`) and its folder (:mod:`~beyond_top1.scans.files`)."""

from beyond_top1.data import texts_fingerprint
from beyond_top1.scans.files import (
    FINAL_FILES,
    SATURATION_FILE,
    SETTINGS_FILE,
    SHARDS_DIR,
    SUMMARY_FILE,
    TEXTS_FILE,
    TIMING_FILE,
    TRAJECTORIES_FILE,
    TRAJECTORY_FIELDS,
    load_scan,
    save_scan,
    scan_dataset,
    scan_ordering,
)
from beyond_top1.scans.result import ScanFileError, ScanResult
from beyond_top1.scans.run import MARGIN_TOLERANCE, scan

__all__ = [
    "FINAL_FILES",
    "MARGIN_TOLERANCE",
    "SATURATION_FILE",
    "SETTINGS_FILE",
    "SHARDS_DIR",
    "SUMMARY_FILE",
    "TEXTS_FILE",
    "TIMING_FILE",
    "TRAJECTORIES_FILE",
    "TRAJECTORY_FIELDS",
    "ScanFileError",
    "ScanResult",
    "load_scan",
    "save_scan",
    "scan",
    "scan_dataset",
    "scan_ordering",
    "texts_fingerprint",
]
