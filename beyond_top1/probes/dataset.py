"""Probe rows: (``resid_post`` at layer ``l``, task label, text, layer, position) from a scan
and the streamed residuals of its texts, balanced per layer by seeded random undersampling.
(:func:`task_dataset` is just over 100 lines: about 30 are its docstring.)

Rows are chosen from the scan *before* any residual is streamed, so only the kept rows are ever
held.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import distributed, hooked
from beyond_top1.activations import stream_residuals
from beyond_top1.data import texts_fingerprint
from beyond_top1.probes.labels import task_labels
from beyond_top1.saturation import DEFAULT_FILTER_FRACTION, position_filter

FEATURES = ("raw", "rms")


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
    texts: Sequence[str] | None = None,
    *,
    n_tasks: int | None = None,
    layers: Sequence[int] | None = None,
    min_layer: int = 0,
    filter_fraction: float = DEFAULT_FILTER_FRACTION,
    max_per_class: int | None = None,
    balance: bool = True,
    features: str = "raw",
    seed: int = 0,
    progress: bool = True,
    k: int | None = None,
) -> TaskDataset:
    """Probe rows from a scan and the residual streams of the texts it was made on.

    Args:
        model: the model the scan was made with (checked by its unembedding fingerprint).
        scan: a :class:`~beyond_top1.scans.ScanResult`.
        texts: the scan's texts, in the same order (checked by their fingerprint); default: the
            texts the scan keeps.
        n_tasks: tasks ``1..n_tasks`` (default: the scan's ``k``; must not exceed it).
        layers: layers to take rows from (default ``0..L-1``); only those ``>= min_layer`` kept.
        filter_fraction: keep positions with ``s_1 <= floor(filter_fraction · L)`` (001).
        max_per_class: at most this many rows per (layer, task).
        balance: undersample every task to the same count at each layer (seeded); a layer
            where some task never occurs then contributes no rows, so the layer carries
            no information about the label.
        features: ``"raw"`` resid_post, or ``"rms"`` (divided by its RMS).
        seed: the undersampling seed.
        k: the old name of ``n_tasks`` (deprecated: ``k`` means ranks everywhere else).

    Returns:
        A :class:`TaskDataset` (features float32, on the CPU).
    """
    if k is not None:
        warnings.warn(
            "task_dataset(k=...) is now n_tasks=...; k goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        n_tasks = k if n_tasks is None else n_tasks
    texts = scan_texts(scan, texts)
    check_scan_matches(model, scan, texts)
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    L = hooked.n_layers(model)
    n_tasks = scan.k if n_tasks is None else int(n_tasks)
    if not 2 <= n_tasks <= scan.k:
        raise ValueError(f"n_tasks must be between 2 and the scan's k={scan.k}, got {n_tasks}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    layer_list = _layers(layers, min_layer, L)
    s = np.array(scan.saturation_array()[:, :n_tasks], dtype=np.int64)  # a writable copy
    kept = np.flatnonzero(position_filter(torch.as_tensor(s[:, 0]), L, filter_fraction).numpy())
    labels = task_labels(s[kept], layer_list, L)
    available = _label_counts(labels, layer_list, n_tasks)
    pick, cols = _select_rows(labels, n_tasks, balance, max_per_class, seed)
    if not len(pick):
        why = (
            "no layer has all the tasks (balancing needs every task at a layer)" if balance else ""
        )
        raise ValueError(
            f"no probe rows for n_tasks={n_tasks}: {why or 'no labelled (position, layer)'}; "
            f"{len(kept)} of {len(s)} positions pass the filter. Use fewer tasks, more texts, "
            "a lower min_layer or balance=False"
        )
    rows = kept[pick]
    row_layers = np.asarray(layer_list, dtype=np.int64)[cols]
    frame = scan.saturation
    X = _features(model, scan, texts, rows, row_layers, features, progress)
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
        y=labels[pick, cols].astype(np.int64),
        groups=frame["text_id"].to_numpy()[rows].astype(np.int64),
        layers=row_layers.astype(np.int64),
        positions=frame["pos"].to_numpy()[rows].astype(np.int64),
        rows=rows.astype(np.int64),
        k=n_tasks,
        available=available,
        meta=meta,
    )


def _layers(layers: Sequence[int] | None, min_layer: int, n_layers: int) -> list[int]:
    """The sorted layers to take rows from: ``layers`` (default all) at or above ``min_layer``."""
    chosen = sorted({int(l) for l in (range(n_layers) if layers is None else layers)})
    chosen = [l for l in chosen if l >= min_layer]
    if not chosen or chosen[0] < 0 or chosen[-1] > n_layers - 1:
        raise ValueError(
            f"no layers to use: give layers in [0, {n_layers - 1}] at or above min_layer"
        )
    return chosen


def _label_counts(labels: np.ndarray, layers: list[int], n_tasks: int) -> pd.DataFrame:
    """How many labelled positions each (layer, task) has, before any balancing."""
    counts = [
        (layer, c, int((labels[:, j] == c).sum()))
        for j, layer in enumerate(layers)
        for c in range(1, n_tasks + 1)
    ]
    return pd.DataFrame(counts, columns=["layer", "task", "count"])


def scan_texts(scan, texts: Sequence[str] | None) -> list[str]:
    """``texts``, or the texts the scan keeps (refusing one string, and a scan without them)."""
    if texts is None:
        if getattr(scan, "texts", None) is None:
            raise ValueError(
                "this scan does not hold its texts (it was saved by an older version): pass "
                "the texts it was made on"
            )
        return list(scan.texts)
    if isinstance(texts, str | bytes):
        raise TypeError("texts must be a list of strings, not one string")
    return list(texts)


def _features(model, scan, texts, rows, row_layers, features: str, progress: bool):
    """``resid_post`` of scan row ``rows[i]`` at layer ``row_layers[i]`` (rows sorted), streamed
    with the scan's own batching, so the positions line up with its rows (checked)."""
    X = np.zeros((len(rows), hooked.d_model(model)), dtype=np.float32)
    needed = sorted(set(row_layers.tolist()))
    settings = scan.settings or {}
    batch_size = int(settings.get("batch_size", 8))
    stream = {"batch_size": batch_size, "max_len": settings.get("max_len")}
    stream["score_first"] = bool(settings.get("score_first", True))  # older scans scored it
    stream["progress"] = progress
    where = distributed.ranks()  # under torchrun: each rank its batches, then one all-reduce
    batches = stream_residuals(model, texts, layers=needed, **distributed.sharded(stream, where))
    text_ids = scan.saturation["text_id"].to_numpy()
    positions = scan.saturation["pos"].to_numpy()
    batch_of_row = text_ids // batch_size  # scan rows are in text order
    column = {layer: j for j, layer in enumerate(needed)}
    last = int(rows[-1])

    def extract() -> int:
        filled = 0
        for batch in batches:
            lo = int(np.searchsorted(batch_of_row, batch.batch_index, "left"))
            hi = int(np.searchsorted(batch_of_row, batch.batch_index, "right"))
            if lo > last:
                break
            if not (
                hi - lo == len(batch)
                and np.array_equal(batch.text_ids.cpu().numpy(), text_ids[lo:hi])
                and np.array_equal(batch.positions.cpu().numpy(), positions[lo:hi])
            ):
                raise ValueError(
                    "the streamed positions do not line up with the scan's rows: pass the "
                    "texts the scan was made on (same order, max_len and batch size)"
                )
            start, end = np.searchsorted(rows, lo), np.searchsorted(rows, hi)
            if end > start:
                local = torch.as_tensor(rows[start:end] - lo, device=batch.resid.device)
                cols = [column[int(l)] for l in row_layers[start:end]]
                picked = batch.resid[local, torch.as_tensor(cols, device=batch.resid.device)]
                X[start:end] = normalise_features(picked.float(), features).cpu().numpy()
                filled += int(end - start)
        return filled

    filled = sum(distributed.all_gather(distributed.run_checked(extract, where), where))
    if filled != len(rows):
        raise ValueError("the texts yielded fewer positions than the scan holds")
    if where.active:  # each row was filled on one rank, zeros elsewhere: the sum is exact
        X = distributed.all_reduce_sum(torch.from_numpy(X), where).numpy()
    return X


__all__ = [
    "FEATURES",
    "TaskDataset",
    "check_scan_matches",
    "normalise_features",
    "scan_texts",
    "task_dataset",
    "text_hash",
]
