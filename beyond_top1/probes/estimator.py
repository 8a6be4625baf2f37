"""The task probe: a scikit-learn estimator (``StandardScaler`` + one-vs-rest
``LogisticRegression``), the one way to apply it to residuals, and its ``.safetensors`` file
tied to a model and layer set (001; docs/definitions.md, "Probe")."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.fileio import write_signed_file
from beyond_top1.probes.dataset import TaskDataset, normalise_features
from beyond_top1.safetensors_file import save_arrays

PROBE_FORMAT = "beyond-top1-task-probe"
PROBE_FORMAT_VERSION = 1
DEFAULT_MIN_PER_CLASS = 5


class ProbeFileError(ValueError):
    """A probe file is missing, corrupt, or was saved for another model."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def _unpack(X, y):
    if isinstance(X, TaskDataset):
        if y is not None:
            raise ValueError("pass either a TaskDataset or (X, y), not both")
        return X.X, X.y, X
    return X, y, None


class TaskProbe(ClassifierMixin, BaseEstimator):
    """Which task (rank being determined) a ``resid_post`` vector belongs to (001).

    A ``StandardScaler`` + one-vs-rest ``LogisticRegression`` pipeline. ``fit`` takes a
    :class:`TaskDataset` (which also ties the probe to the model and layer set, so it can be
    saved) or plain ``(X, y)``. After fitting, prediction uses the extracted weights (the same
    numbers as the fitted pipeline, which is kept as ``pipeline_``), so a loaded probe predicts
    identically without pickled scikit-learn objects.

    >>> data = bt.task_dataset(model, scan, texts, k=3, min_layer=5)
    >>> probe = bt.TaskProbe().fit(data)
    >>> probe.save("probe.safetensors")
    >>> probe = bt.load_probe("probe.safetensors", model)
    """

    def __init__(
        self,
        C: float = 1.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        min_per_class: int = DEFAULT_MIN_PER_CLASS,
    ):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.min_per_class = min_per_class

    def _pipeline(self):
        return Pipeline(
            [
                ("scale", StandardScaler()),
                (
                    "ovr",
                    OneVsRestClassifier(
                        LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol)
                    ),
                ),
            ]
        )

    def fit(self, X, y=None) -> TaskProbe:
        """Fit on a :class:`TaskDataset` or on ``X [n, d]``, ``y [n]`` (task ids)."""
        X, y, dataset = _unpack(X, y)
        if y is None:
            raise ValueError("y is missing: pass a TaskDataset, or X and y")
        X = np.asarray(X)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be [n, d] with one label per row; got {X.shape}, {y.shape}")
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise ValueError(
                f"a probe needs at least 2 tasks in the data, got {classes.tolist()}; use more "
                "texts, more layers or a lower min_layer"
            )
        few = [(int(c), int(n)) for c, n in zip(classes, counts, strict=True)]
        few = [(c, n) for c, n in few if n < self.min_per_class]
        if few:
            detail = ", ".join(f"task {c}: {n}" for c, n in few)
            raise ValueError(
                f"too few examples per class ({detail}; need at least {self.min_per_class} "
                "each): use more texts, a larger max_per_class, a smaller k or a lower min_layer"
            )
        pipeline = self._pipeline().fit(X, y)
        scaler, ovr = pipeline.named_steps["scale"], pipeline.named_steps["ovr"]
        self.pipeline_ = pipeline
        self.classes_ = np.asarray(ovr.classes_)
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = np.asarray(scaler.scale_, dtype=np.float64)
        self.coef_ = np.stack([e.coef_[0] for e in ovr.estimators_]).astype(np.float64)
        self.intercept_ = np.array([e.intercept_[0] for e in ovr.estimators_], dtype=np.float64)
        self.n_features_in_ = X.shape[1]
        self.metadata_ = _probe_metadata(dataset)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError("this TaskProbe is not fitted yet: call fit(...) or load_probe(...)")

    def decision_function(self, X) -> Float[np.ndarray, "n n_estimators"]:
        """One-vs-rest logits (one column per class; a single column for two classes)."""
        self._check_fitted()
        X, _, _ = _unpack(X, None)
        X = np.asarray(X.cpu() if isinstance(X, Tensor) else X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X must be [n, {self.n_features_in_}] (the probe's d_model), got {X.shape}"
            )
        return ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> Float[np.ndarray, "n n_classes"]:
        """Class probabilities as scikit-learn's one-vs-rest computes them (columns:
        ``classes_``)."""
        scores = _sigmoid(self.decision_function(X))
        if scores.shape[1] == 1:
            return np.hstack([1 - scores, scores])
        return scores / scores.sum(axis=1, keepdims=True)

    def predict(self, X) -> Int[np.ndarray, " n"]:
        """The predicted task per row."""
        scores = self.decision_function(X)
        if scores.shape[1] == 1:
            return self.classes_[(scores[:, 0] > 0).astype(np.int64)]
        return self.classes_[scores.argmax(axis=1)]

    def score(self, X, y=None, sample_weight=None) -> float:
        """Accuracy on a :class:`TaskDataset` or on ``(X, y)``."""
        X, y, _ = _unpack(X, y)
        return super().score(X, y, sample_weight=sample_weight)

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers the probe has training rows from (empty when fitted on plain arrays).

        With per-layer balancing these are the layers where all ``k`` tasks occur; the
        requested layer set is ``metadata_["layers"]``."""
        meta = getattr(self, "metadata_", {})
        return tuple(meta.get("trained_layers", meta.get("layers", ())))

    @property
    def features(self) -> str:
        return getattr(self, "metadata_", {}).get("features", "raw")

    def predict_resid(self, resid: Float[Tensor, "n d_model"]) -> Int[np.ndarray, " n"]:
        """Predicted task of raw ``resid_post`` vectors (normalised as the probe was trained)."""
        return apply_probe(self, resid[:, None])[0][:, 0].astype(np.int64)

    def save(self, path: str | Path) -> Path:
        """Write the probe to one ``.safetensors`` file with its metadata (model, layers, k)."""
        return save_probe(self, path)


def apply_probe(
    probe, resid: Float[Tensor, "tokens layer d_model"]
) -> tuple[Int[np.ndarray, "tokens layer"], Float[np.ndarray, "tokens layer"] | None]:
    """A task probe's prediction from raw ``resid_post`` at every layer, and its probability of
    task ``>= 2`` (``None`` without ``predict_proba``/``classes_``). The one way the toolkit
    applies a probe: any object with ``predict(X[n, d_model]) -> task`` works; features are
    normalised as the probe was trained (``probe.features``, default raw)."""
    tokens, layers, d = resid.shape
    x = resid.reshape(tokens * layers, d).float().cpu()
    features = getattr(probe, "features", "raw")
    x = normalise_features(x, features if isinstance(features, str) else "raw").numpy()
    tasks = np.asarray(probe.predict(x)).reshape(tokens, layers).astype(np.int16)
    settled = None
    if hasattr(probe, "predict_proba") and hasattr(probe, "classes_"):
        proba = np.asarray(probe.predict_proba(x))
        settled = proba[:, np.asarray(probe.classes_) >= 2].sum(axis=1)
        settled = settled.reshape(tokens, layers).astype(np.float32)
    return tasks, settled


def probe_identity(probe) -> str:
    """What ties a probe to results made with it: a hash of a TaskProbe's arrays, or the type."""
    if isinstance(probe, TaskProbe) and hasattr(probe, "coef_"):
        arrays = {name: np.ascontiguousarray(getattr(probe, name)) for name in _ARRAYS}
        return f"TaskProbe:{_arrays_sha256(arrays)[:16]}"
    return type(probe).__name__


def _probe_metadata(dataset: TaskDataset | None) -> dict:
    if dataset is None:
        return {}
    keep = (
        "model_name",
        "unembedding_fingerprint",
        "n_layers",
        "d_model",
        "layers",
        "min_layer",
        "features",
        "filter_fraction",
        "lens",
    )
    meta = {key: dataset.meta.get(key) for key in keep}
    by_id = dataset.meta.get("text_hash_by_id") or {}
    meta["text_hashes"] = sorted(
        {by_id[int(g)] for g in np.unique(dataset.groups) if int(g) in by_id}
    )
    meta["k"] = dataset.k
    meta["trained_layers"] = list(dataset.layer_set)
    meta["n_train_rows"] = len(dataset)
    return meta


_ARRAYS = ("classes_", "mean_", "scale_", "coef_", "intercept_")


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        data = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{data.dtype}:{data.shape}".encode())
        digest.update(data.tobytes())
    return digest.hexdigest()


def save_probe(probe: TaskProbe, path: str | Path) -> Path:
    """Write a fitted probe as ``path`` (``.safetensors``): weights plus JSON metadata."""
    probe._check_fitted()
    meta = getattr(probe, "metadata_", {})
    if not meta.get("unembedding_fingerprint"):
        raise ValueError(
            "this probe does not know its model (it was fitted on plain arrays); fit it on a "
            "TaskDataset from bt.task_dataset(...) to save it"
        )
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    arrays = {name: np.ascontiguousarray(getattr(probe, name)) for name in _ARRAYS}
    header = {
        "format": PROBE_FORMAT,
        "format_version": str(PROBE_FORMAT_VERSION),
        "params": json.dumps(probe.get_params()),
        "metadata": json.dumps(meta),
        "arrays_sha256": _arrays_sha256(arrays),
    }
    return write_signed_file(
        path, lambda tmp: save_arrays(tmp, arrays, metadata=header), PROBE_FORMAT.encode()
    )


def load_probe(path: str | Path, model=None) -> TaskProbe:
    """Read a probe written by :meth:`TaskProbe.save`.

    With ``model`` the probe must have been trained on that model's residuals (same unembedding
    fingerprint and ``d_model``); otherwise :class:`ProbeFileError` says so.
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeFileError(f"no probe file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
        arrays = load_file(str(path))
        if header.get("format") != PROBE_FORMAT:
            raise ProbeFileError(f"{path} is not a beyond-top1 task probe")
        if int(header.get("format_version", -1)) > PROBE_FORMAT_VERSION:
            raise ProbeFileError(f"{path} was written by a newer beyond-top1; upgrade to read it")
        params = json.loads(header["params"])
        meta = json.loads(header["metadata"])
        expected = header["arrays_sha256"]
    except ProbeFileError:
        raise
    except (OSError, SafetensorError, ValueError, KeyError) as exc:
        raise ProbeFileError(f"corrupt probe file {path}: {exc}. Fit and save it again.") from None
    if set(arrays) != set(_ARRAYS) or _arrays_sha256(arrays) != expected:
        raise ProbeFileError(f"corrupt probe file {path}: its weights fail their checksum")
    if model is not None:
        fingerprint = hooked.unembedding_fingerprint(model)
        if meta.get("unembedding_fingerprint") != fingerprint or meta.get(
            "d_model"
        ) != hooked.d_model(model):
            raise ProbeFileError(
                f"{path} was trained on {meta.get('model_name')!r} (another unembedding), not "
                f"on {hooked.model_name(model)!r}: fit a probe for this model"
            )
    probe = TaskProbe(**params)
    for name in _ARRAYS:
        setattr(probe, name, arrays[name])
    probe.n_features_in_ = int(arrays["mean_"].shape[0])
    probe.metadata_ = meta
    return probe


# ---------------------------------------------------------------------------------------------
# Cross-validation
# ---------------------------------------------------------------------------------------------


def read_probe(path: str | Path | None, model=None):
    """A task probe from a file: ``.safetensors`` from :meth:`TaskProbe.save` (checked against
    ``model``), or a pickle of any object with ``predict`` (only load pickles you trust);
    ``None`` for no path."""
    if not path:
        return None
    if str(path).endswith(".safetensors"):
        return load_probe(path, model)
    with open(path, "rb") as handle:
        probe = pickle.load(handle)  # noqa: S301 - the user's own artefact
    if not hasattr(probe, "predict"):
        raise ValueError(f"{path} holds a {type(probe).__name__}, which has no predict()")
    return probe


__all__ = [
    "DEFAULT_MIN_PER_CLASS",
    "ProbeFileError",
    "TaskProbe",
    "apply_probe",
    "load_probe",
    "probe_identity",
    "read_probe",
    "save_probe",
]
