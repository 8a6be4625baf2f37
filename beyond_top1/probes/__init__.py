"""Task-index probes on ``resid_post`` (paper 001; docs/definitions.md, "Task index", "Probe").

* :mod:`.labels`: which rank a position is determining at each layer (:func:`task_labels`).
* :mod:`.dataset`: probe rows from a scan and its streamed residuals (:func:`task_dataset`).
* :mod:`.estimator`: :class:`TaskProbe`, :func:`apply_probe` and the probe file.
* :mod:`.cv`: :func:`cross_validate_task_probe` grouped by text with a shuffled baseline.
"""

from beyond_top1.probes.cv import ProbeCV, cross_validate_task_probe
from beyond_top1.probes.dataset import (
    FEATURES,
    TaskDataset,
    check_scan_matches,
    normalise_features,
    scan_texts,
    task_dataset,
    text_hash,
)
from beyond_top1.probes.estimator import (
    DEFAULT_MIN_PER_CLASS,
    PROBE_FORMAT,
    ProbeFileError,
    TaskProbe,
    apply_probe,
    load_probe,
    probe_identity,
    read_probe,
    save_probe,
)
from beyond_top1.probes.labels import EXCLUDED, task_labels

__all__ = [
    "DEFAULT_MIN_PER_CLASS",
    "EXCLUDED",
    "FEATURES",
    "PROBE_FORMAT",
    "ProbeCV",
    "ProbeFileError",
    "TaskDataset",
    "TaskProbe",
    "apply_probe",
    "check_scan_matches",
    "cross_validate_task_probe",
    "load_probe",
    "normalise_features",
    "probe_identity",
    "read_probe",
    "save_probe",
    "scan_texts",
    "task_dataset",
    "task_labels",
    "text_hash",
]
