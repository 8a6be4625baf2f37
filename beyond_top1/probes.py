"""Task-index probes on ``resid_post`` (paper 001; docs/definitions.md, "Task index", "Probe").

* :func:`task_labels`: which rank a position is "determining" at each layer, from its saturation
  layers ``s_1..s_k``; out-of-order (ambiguous) layers and layers after ``s_k`` are excluded.
* :func:`task_dataset`: (feature = ``resid_post`` at layer ``l``, label, group = text id, layer,
  position) rows from a scan and the streamed residuals, balanced per layer by seeded random
  undersampling. Rows are chosen from the scan *before* any residual is streamed, so only the
  kept rows are ever held.
* :class:`TaskProbe`: a scikit-learn estimator, ``StandardScaler`` + one-vs-rest
  ``LogisticRegression``, saved as one ``.safetensors`` file tied to a model and a layer set.
* :func:`cross_validate_task_probe`: ``GroupKFold`` by text (neighbouring layers of one token
  never sit on both sides of a split) with the shuffled-label baseline from the same pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.fileio import to_jsonable, write_signed_file
from beyond_top1.saturation import DEFAULT_FILTER_FRACTION, position_filter

EXCLUDED = 0
"""Label of an excluded (position, layer): out of order, or after ``s_k``. Tasks are 1..k."""

FEATURES = ("raw", "rms")
PROBE_FORMAT = "beyond-top1-task-probe"
PROBE_FORMAT_VERSION = 1
DEFAULT_MIN_PER_CLASS = 5


class ProbeFileError(ValueError):
    """A probe file is missing, corrupt, or was saved for another model."""


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def task_labels(
    s: Int[np.ndarray, "n k"] | Int[Tensor, "n k"],
    layers: Sequence[int],
    n_layers: int,
) -> Int[np.ndarray, "n n_layers_given"]:
    """The task index of every position at every layer in ``layers`` (docs/definitions.md).

    Rank ``j`` counts as *saturated at layer l* when ``s_j < l`` (it has been fixed since an
    earlier layer). At layer ``l`` a position is doing task ``i`` when exactly ranks ``1..i-1``
    are saturated: ``s_{i-1} < l <= s_i`` with ``s_0 = -1`` *and* no later rank ``j > i`` has
    saturated yet. Otherwise the label is :data:`EXCLUDED` (0):

    * out of order: some rank ``j`` is saturated while an earlier rank is not (e.g.
      ``s = (8, 3, ...)`` at layers 4..8). This is stricter than "the formula gives two
      labels": ``s = (2, 8, 5)`` at layer 6 also counts as ambiguous, since rank 3 is done
      before rank 2;
    * after ``s_k``: all ``k`` tracked ranks are saturated (``l > s_k``); the position would be
      doing task ``k+1`` or more, which ``k`` ranks cannot tell, so it is left out.

    Args:
        s: ``[n, k]`` saturation layers in ``0..L-1``.
        layers: the layers to label (``0..L-1``).
        n_layers: ``L``.

    Returns:
        ``[n, len(layers)]`` int64 labels in ``1..k``, or 0 where excluded.
    """
    s = np.asarray(s.cpu() if isinstance(s, Tensor) else s).astype(np.int64)
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"s must have shape [n, k] with k >= 1, got {s.shape}")
    if s.size and (s.min() < 0 or s.max() > n_layers - 1):
        raise ValueError(f"saturation layers must lie in [0, {n_layers - 1}]")
    layer_arr = np.asarray(list(layers), dtype=np.int64)
    if layer_arr.size and (layer_arr.min() < 0 or layer_arr.max() > n_layers - 1):
        raise ValueError(f"layers must lie in [0, {n_layers - 1}], got {list(layers)}")
    k = s.shape[1]
    saturated = s[:, None, :] < layer_arr[None, :, None]  # [n, layers, k]
    count = saturated.sum(-1)
    prefix = np.cumprod(saturated, axis=-1).sum(-1)  # leading saturated ranks
    ok = (prefix == count) & (count < k)
    return np.where(ok, count + 1, EXCLUDED).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def normalise_features(
    resid: Float[Tensor, "... d_model"] | Float[np.ndarray, "... d_model"], features: str
):
    """``"raw"``: unchanged; ``"rms"``: divided by its root-mean-square (scale-free)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if features == "raw":
        return resid
    if isinstance(resid, Tensor):
        return resid / resid.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    rms = np.sqrt(np.mean(np.square(resid, dtype=np.float64), axis=-1, keepdims=True))
    return (resid / np.maximum(rms, 1e-12)).astype(resid.dtype)


@dataclass
class TaskDataset:
    """Probe rows: ``X[i]`` is ``resid_post`` at layer ``layers[i]`` of scan row ``rows[i]``
    (text ``groups[i]``, token position ``positions[i]``), labelled with task ``y[i]`` (1..k).

    ``available`` counts the labelled (position, layer) cells per layer and class before
    balancing; ``meta`` ties the rows to their model, layer set and settings.
    """

    X: Float[np.ndarray, "m d_model"]
    y: Int[np.ndarray, " m"]
    groups: Int[np.ndarray, " m"]
    layers: Int[np.ndarray, " m"]
    positions: Int[np.ndarray, " m"]
    rows: Int[np.ndarray, " m"]
    k: int
    available: pd.DataFrame = field(repr=False)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def layer_set(self) -> tuple[int, ...]:
        return tuple(int(l) for l in np.unique(self.layers))

    def counts(self) -> pd.DataFrame:
        """Rows per layer (index) and task (columns)."""
        frame = pd.crosstab(self.layers, self.y).rename_axis(index="layer", columns="task")
        return frame.reindex(columns=range(1, self.k + 1), fill_value=0)

    def subset(self, index: np.ndarray) -> TaskDataset:
        index = np.asarray(index)
        return TaskDataset(
            self.X[index],
            self.y[index],
            self.groups[index],
            self.layers[index],
            self.positions[index],
            self.rows[index],
            self.k,
            self.available,
            dict(self.meta),
        )

    def summary(self) -> dict:
        return {
            "n_rows": len(self),
            "n_texts": int(np.unique(self.groups).size),
            "k": self.k,
            "layers": list(self.layer_set),
            "rows_per_task": {
                int(c): int(n) for c, n in zip(*np.unique(self.y, return_counts=True), strict=True)
            },
            **{
                key: self.meta[key]
                for key in ("model_name", "features", "seed")
                if key in self.meta
            },
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"TaskDataset({s['n_rows']} rows, {s['n_texts']} texts, k={self.k}, "
            f"{len(s['layers'])} layers, d={self.X.shape[1] if self.X.ndim == 2 else '?'})"
        )

    def _repr_html_(self) -> str:
        return f"<div><b>{self!r}</b>{self.counts().to_html()}</div>"


def text_hash(text: str) -> str:
    """A short SHA-256 of one text: what a probe records of the texts it was fitted on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_scan_matches(model, scan, texts: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``scan`` was made with ``model`` on exactly ``texts``."""
    from beyond_top1.scans import texts_fingerprint

    settings = scan.settings or {}
    fingerprint = settings.get("unembedding_fingerprint")
    if fingerprint and fingerprint != hooked.unembedding_fingerprint(model):
        raise ValueError(
            f"the scan was made with another model ({settings.get('model_name')!r}); pass the "
            "model it was made with, or re-run the scan"
        )
    if scan.n_layers != hooked.n_layers(model):
        raise ValueError(
            f"the scan has {scan.n_layers} layers but the model has {hooked.n_layers(model)}"
        )
    n_texts = settings.get("n_texts")
    if n_texts is not None and n_texts != len(texts):
        raise ValueError(
            f"the scan was made on {n_texts} texts but {len(texts)} were given; pass the "
            "same texts, in the same order"
        )
    sha = settings.get("texts_sha256")
    if sha and sha != texts_fingerprint(texts):
        raise ValueError(
            "these texts are not the ones the scan was made on (their fingerprint differs); "
            "pass the same texts, in the same order"
        )


def _select_rows(
    labels: np.ndarray, k: int, balance: bool, max_per_class: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-layer undersampling: ``(position index, layer column)`` of the kept cells."""
    rng = np.random.default_rng(seed)
    chosen_rows, chosen_cols = [], []
    for col in range(labels.shape[1]):
        members = [np.flatnonzero(labels[:, col] == c) for c in range(1, k + 1)]
        if balance:
            n = min(len(m) for m in members)
            if max_per_class is not None:
                n = min(n, max_per_class)
            take = [n] * k
        else:
            cap = max_per_class if max_per_class is not None else labels.shape[0]
            take = [min(len(m), cap) for m in members]
        for m, n in zip(members, take, strict=True):
            if n == 0:
                continue
            picked = m if n == len(m) else np.sort(rng.choice(m, size=n, replace=False))
            chosen_rows.append(picked)
            chosen_cols.append(np.full(n, col, dtype=np.int64))
    if not chosen_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = np.concatenate(chosen_rows), np.concatenate(chosen_cols)
    order = np.lexsort((cols, rows))
    return rows[order], cols[order]


def task_dataset(
    model,
    scan,
    texts: Sequence[str],
    *,
    k: int | None = None,
    layers: Sequence[int] | None = None,
    min_layer: int = 0,
    filter_fraction: float = DEFAULT_FILTER_FRACTION,
    max_per_class: int | None = None,
    balance: bool = True,
    features: str = "raw",
    seed: int = 0,
    progress: bool = True,
) -> TaskDataset:
    """Probe rows from a scan and the residual streams of the texts it was made on.

    Args:
        model: the model the scan was made with (checked by its unembedding fingerprint).
        scan: a :class:`~beyond_top1.scans.ScanResult`.
        texts: the scan's texts, in the same order (checked by their fingerprint).
        k: tasks ``1..k`` (default: the scan's ``k``; must not exceed it).
        layers: layers to take rows from (default ``0..L-1``); only those ``>= min_layer`` kept.
        filter_fraction: keep positions with ``s_1 <= floor(filter_fraction · L)`` (001).
        max_per_class: at most this many rows per (layer, task).
        balance: undersample every task to the same count at each layer (seeded); a layer
            where some task ``1..k`` never occurs then contributes no rows, so the layer carries
            no information about the label.
        features: ``"raw"`` resid_post, or ``"rms"`` (divided by its RMS).
        seed: the undersampling seed.

    Returns:
        A :class:`TaskDataset` (features float32, on the CPU).
    """
    from beyond_top1.activations import stream_residuals

    texts = list(texts)
    check_scan_matches(model, scan, texts)
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    L = hooked.n_layers(model)
    k = scan.k if k is None else int(k)
    if not 2 <= k <= scan.k:
        raise ValueError(f"k must be between 2 and the scan's k={scan.k}, got {k}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    layer_list = sorted({int(l) for l in (range(L) if layers is None else layers)})
    layer_list = [l for l in layer_list if l >= min_layer]
    if not layer_list or layer_list[0] < 0 or layer_list[-1] > L - 1:
        raise ValueError(f"no layers to use: give layers in [0, {L - 1}] at or above min_layer")
    s = np.array(scan.saturation_array()[:, :k], dtype=np.int64)  # a writable copy
    kept = np.flatnonzero(position_filter(torch.as_tensor(s[:, 0]), L, filter_fraction).numpy())
    labels = task_labels(s[kept], layer_list, L)
    available = pd.DataFrame(
        [
            (layer, c, int((labels[:, j] == c).sum()))
            for j, layer in enumerate(layer_list)
            for c in range(1, k + 1)
        ],
        columns=["layer", "task", "count"],
    )
    pick, cols = _select_rows(labels, k, balance, max_per_class, seed)
    if not len(pick):
        why = "no layer has all k tasks (balancing needs every task at a layer)" if balance else ""
        raise ValueError(
            f"no probe rows for k={k}: {why or 'no labelled (position, layer)'}; "
            f"{len(kept)} of {len(s)} positions pass the filter. Use a smaller k, more texts, "
            "a lower min_layer or balance=False"
        )
    rows = kept[pick]
    row_layers = np.asarray(layer_list, dtype=np.int64)[cols] if len(cols) else cols
    y = labels[pick, cols] if len(pick) else np.zeros(0, np.int64)
    frame = scan.saturation
    X = np.zeros((len(rows), hooked.d_model(model)), dtype=np.float32)
    needed = sorted(set(row_layers.tolist()))
    if len(rows):
        settings = scan.settings or {}
        batches = stream_residuals(
            model,
            texts,
            layers=needed,
            batch_size=int(settings.get("batch_size", 8)),
            max_len=settings.get("max_len"),
            progress=progress,
            score_first=bool(settings.get("score_first", True)),  # older scans scored it
        )
        text_ids = frame["text_id"].to_numpy()
        positions = frame["pos"].to_numpy()
        column = {layer: j for j, layer in enumerate(needed)}
        offset, cursor, last = 0, 0, int(rows[-1])
        for batch in batches:
            n = len(batch)
            if not (
                np.array_equal(batch.text_ids.cpu().numpy(), text_ids[offset : offset + n])
                and np.array_equal(batch.positions.cpu().numpy(), positions[offset : offset + n])
            ):
                raise ValueError(
                    "the streamed positions do not line up with the scan's rows: pass the texts "
                    "the scan was made on (same order, max_len and batch size)"
                )
            end = cursor + np.searchsorted(rows[cursor:], offset + n)
            if end > cursor:
                local = torch.as_tensor(rows[cursor:end] - offset)
                layer_cols = torch.as_tensor([column[int(l)] for l in row_layers[cursor:end]])
                picked = batch.resid[
                    local.to(batch.resid.device), layer_cols.to(batch.resid.device)
                ]
                X[cursor:end] = normalise_features(picked.float(), features).cpu().numpy()
                cursor = end
            offset += n
            if offset > last:
                break
        if cursor != len(rows):
            raise ValueError("the texts yielded fewer positions than the scan holds")
    meta = {
        "model_name": hooked.model_name(model),
        "unembedding_fingerprint": hooked.unembedding_fingerprint(model),
        "n_layers": L,
        "d_model": hooked.d_model(model),
        "layers": layer_list,
        "min_layer": min_layer,
        "filter_fraction": filter_fraction,
        "max_per_class": max_per_class,
        "balance": balance,
        "features": features,
        "seed": seed,
        "n_positions": len(s),
        "n_positions_kept": len(kept),
        "lens": (scan.settings or {}).get("lens"),
        # which text each group is, so a fitted probe can name the texts it saw (held-out checks)
        "text_hash_by_id": {int(t): text_hash(texts[t]) for t in set(frame["text_id"].iloc[rows])},
    }
    return TaskDataset(
        X=X,
        y=y.astype(np.int64),
        groups=frame["text_id"].to_numpy()[rows].astype(np.int64),
        layers=row_layers.astype(np.int64),
        positions=frame["pos"].to_numpy()[rows].astype(np.int64),
        rows=rows.astype(np.int64),
        k=k,
        available=available,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------


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
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

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
        return self.predict(normalise_features(resid.float(), self.features))

    def save(self, path: str | Path) -> Path:
        """Write the probe to one ``.safetensors`` file with its metadata (model, layers, k)."""
        return save_probe(self, path)


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
    from safetensors.numpy import save_file

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
        path, lambda tmp: save_file(arrays, str(tmp), metadata=header), PROBE_FORMAT.encode()
    )


def load_probe(path: str | Path, model=None) -> TaskProbe:
    """Read a probe written by :meth:`TaskProbe.save`.

    With ``model`` the probe must have been trained on that model's residuals (same unembedding
    fingerprint and ``d_model``); otherwise :class:`ProbeFileError` says so.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

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


@dataclass
class ProbeCV:
    """Grouped cross-validation of a :class:`TaskProbe` with the shuffled-label baseline.

    Attributes:
        folds: one row per fold: sizes, balanced accuracy, accuracy, macro one-vs-rest AUC,
            and the same for the shuffled-label pipeline.
        per_class: per task: accuracy (recall) and one-vs-rest AUC, mean ± SE over folds.
        per_layer: per layer, from the out-of-fold predictions: n, accuracy, balanced
            accuracy, and the shuffled baseline's.
        predictions: out-of-fold predictions per row (``row, layer, y, pred, pred_shuffled``).
    """

    folds: pd.DataFrame
    per_class: pd.DataFrame
    per_layer: pd.DataFrame
    predictions: pd.DataFrame = field(repr=False)
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        f = self.folds
        n = len(f)

        def mean_se(column: str | pd.Series) -> tuple[float, float]:
            values = f[column] if isinstance(column, str) else column
            values = values.dropna()
            se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
            return float(values.mean()), se

        out = dict(self.settings)
        out["n_splits"] = n
        for name, column in (
            ("balanced_accuracy", "balanced_accuracy"),
            ("shuffled_balanced_accuracy", "shuffled_balanced_accuracy"),
            ("accuracy", "accuracy"),
            ("macro_auc", "macro_auc"),
            ("shuffled_macro_auc", "shuffled_macro_auc"),
        ):
            out[f"{name}_mean"], out[f"{name}_se"] = mean_se(column)
        margin = f["balanced_accuracy"] - f["shuffled_balanced_accuracy"]
        out["margin_mean"], out["margin_se"] = mean_se(margin)
        return {key: to_jsonable(value) for key, value in out.items()}

    def _repr_html_(self) -> str:
        summary = pd.Series(self.summary(), name="value").to_frame().to_html()
        per_class = self.per_class.to_html(index=False, float_format="{:.3f}".format)
        return f"<div><b>Task-probe cross-validation</b>{summary}<b>Per task</b>{per_class}</div>"


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (predictions of other classes are wrong)."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, pred))


def _fold_metrics(y: np.ndarray, pred: np.ndarray, proba: np.ndarray, classes: np.ndarray):
    from sklearn.metrics import roc_auc_score

    per_class = {}
    for j, c in enumerate(classes):
        mask = y == c
        accuracy = float((pred[mask] == c).mean()) if mask.any() else math.nan
        auc = float(roc_auc_score(mask, proba[:, j])) if 0 < mask.sum() < len(y) else math.nan
        per_class[int(c)] = (accuracy, auc, int(mask.sum()))
    aucs = [a for _, a, _ in per_class.values() if not math.isnan(a)]
    return {
        "balanced_accuracy": _balanced_accuracy(y, pred),
        "accuracy": float((pred == y).mean()),
        "macro_auc": float(np.mean(aucs)) if aucs else math.nan,
    }, per_class


def cross_validate_task_probe(
    dataset: TaskDataset,
    n_splits: int = 5,
    seed: int = 0,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    shuffled: bool = True,
) -> ProbeCV:
    """Cross-validate a :class:`TaskProbe` with ``GroupKFold`` grouped by text.

    Every fold fits the probe on the training texts and scores it on the held-out texts; with
    ``shuffled`` it also fits the same pipeline on the training labels permuted (seeded per
    fold) and scores that on the true held-out labels: the chance baseline. Balanced accuracy is
    reported as mean ± SE over folds (SE = sample std / sqrt(folds)).
    """
    from sklearn.model_selection import GroupKFold

    n_texts = np.unique(dataset.groups).size
    if n_texts < n_splits:
        raise ValueError(
            f"{n_texts} texts cannot be split into {n_splits} folds by text: use more texts "
            "or fewer splits"
        )
    X, y, groups = dataset.X, dataset.y, dataset.groups
    classes = np.unique(y)
    splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold_rows, class_rows = [], []
    pred_all = np.zeros(len(y), dtype=np.int64)
    pred_shuf = np.zeros(len(y), dtype=np.int64)
    for fold, (train, test) in enumerate(splitter.split(X, y, groups)):
        overlap = np.intersect1d(groups[train], groups[test]).size
        if overlap:  # GroupKFold guarantees this; a broken splitter must not go unnoticed
            raise RuntimeError(f"fold {fold}: {overlap} texts on both sides of the split")
        try:
            probe = TaskProbe(C=C, max_iter=max_iter).fit(X[train], y[train])
        except ValueError as exc:
            raise ValueError(f"fold {fold} of {n_splits}: {exc}") from None
        proba = _aligned_proba(probe, X[test], classes)
        pred = probe.predict(X[test])
        pred_all[test] = pred
        metrics, per_class = _fold_metrics(y[test], pred, proba, classes)
        row = {
            "fold": fold,
            "n_train": len(train),
            "n_test": len(test),
            "n_train_texts": int(np.unique(groups[train]).size),
            "n_test_texts": int(np.unique(groups[test]).size),
            "texts_on_both_sides": overlap,
            **metrics,
        }
        shuffled_class = {}
        if shuffled:
            rng = np.random.default_rng([seed, fold])
            baseline = TaskProbe(C=C, max_iter=max_iter, min_per_class=1)
            baseline.fit(X[train], rng.permutation(y[train]))
            s_pred = baseline.predict(X[test])
            pred_shuf[test] = s_pred
            s_metrics, shuffled_class = _fold_metrics(
                y[test], s_pred, _aligned_proba(baseline, X[test], classes), classes
            )
            row.update({f"shuffled_{key}": value for key, value in s_metrics.items()})
        fold_rows.append(row)
        for c, (accuracy, auc, n) in per_class.items():
            entry = {"fold": fold, "task": c, "n_test": n, "accuracy": accuracy, "auc": auc}
            if shuffled:
                entry["shuffled_accuracy"], entry["shuffled_auc"], _ = shuffled_class[c]
            class_rows.append(entry)
    folds = pd.DataFrame(fold_rows)
    by_class = pd.DataFrame(class_rows)
    per_class_rows = []
    for c, rows in by_class.groupby("task"):
        entry = {"task": int(c), "n_test": int(rows["n_test"].sum())}
        for column in [col for col in rows.columns if col not in ("fold", "task", "n_test")]:
            values = rows[column].dropna()
            entry[f"{column}_mean"] = float(values.mean()) if len(values) else math.nan
            entry[f"{column}_se"] = (
                float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
            )
        per_class_rows.append(entry)
    predictions = pd.DataFrame(
        {
            "row": dataset.rows,
            "text_id": groups,
            "layer": dataset.layers,
            "y": y,
            "pred": pred_all,
        }
    )
    if shuffled:
        predictions["pred_shuffled"] = pred_shuf
    per_layer = _per_layer(predictions, shuffled)
    settings = {
        "k": dataset.k,
        "chance": 1.0 / len(classes),
        "n_rows": len(dataset),
        "n_texts": int(n_texts),
        "n_layers_used": int(np.unique(dataset.layers).size),
        "seed": seed,
        "C": C,
        "features": dataset.meta.get("features"),
        "model_name": dataset.meta.get("model_name"),
    }
    return ProbeCV(folds, pd.DataFrame(per_class_rows), per_layer, predictions, settings)


def _aligned_proba(probe: TaskProbe, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``predict_proba`` with one column per entry of ``classes`` (0 for unseen classes)."""
    proba = probe.predict_proba(X)
    out = np.zeros((len(X), len(classes)))
    for j, c in enumerate(probe.classes_):
        out[:, np.searchsorted(classes, c)] = proba[:, j]
    return out


def _per_layer(predictions: pd.DataFrame, shuffled: bool) -> pd.DataFrame:
    rows = []
    for layer, part in predictions.groupby("layer"):
        entry = {
            "layer": int(layer),
            "n": len(part),
            "accuracy": float((part["pred"] == part["y"]).mean()),
            "balanced_accuracy": _balanced_accuracy(part["y"], part["pred"]),
        }
        if shuffled:
            entry["shuffled_accuracy"] = float((part["pred_shuffled"] == part["y"]).mean())
            entry["shuffled_balanced_accuracy"] = _balanced_accuracy(
                part["y"], part["pred_shuffled"]
            )
        rows.append(entry)
    return pd.DataFrame(rows)


__all__ = [
    "EXCLUDED",
    "ProbeCV",
    "ProbeFileError",
    "TaskDataset",
    "TaskProbe",
    "check_scan_matches",
    "cross_validate_task_probe",
    "load_probe",
    "normalise_features",
    "save_probe",
    "task_dataset",
    "task_labels",
]
