"""Cross-validation of the task probe: ``GroupKFold`` by text (neighbouring layers of one token
never sit on both sides of a split), with the shuffled-label baseline from the same pipeline."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold

from beyond_top1.fileio import to_jsonable
from beyond_top1.probes.dataset import TaskDataset
from beyond_top1.probes.estimator import TaskProbe


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
            if column in f.columns:  # no shuffled columns without the baseline
                out[f"{name}_mean"], out[f"{name}_se"] = mean_se(column)
        if "shuffled_balanced_accuracy" in f.columns:
            margin = f["balanced_accuracy"] - f["shuffled_balanced_accuracy"]
            out["margin_mean"], out["margin_se"] = mean_se(margin)
        return {key: to_jsonable(value) for key, value in out.items()}

    def _repr_html_(self) -> str:
        summary = pd.Series(self.summary(), name="value").to_frame().to_html()
        per_class = self.per_class.to_html(index=False, float_format="{:.3f}".format)
        return f"<div><b>Task-probe cross-validation</b>{summary}<b>Per task</b>{per_class}</div>"


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (predictions of other classes are wrong)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, pred))


def _fold_metrics(y: np.ndarray, pred: np.ndarray, proba: np.ndarray, classes: np.ndarray):
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
        row, per_class = _run_fold(
            dataset,
            classes,
            fold,
            n_splits,
            train,
            test,
            pred_all,
            pred_shuf,
            seed=seed,
            C=C,
            max_iter=max_iter,
            shuffled=shuffled,
        )
        fold_rows.append(row)
        class_rows.extend(per_class)
    folds = pd.DataFrame(fold_rows)
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
    return ProbeCV(folds, _per_class(pd.DataFrame(class_rows)), per_layer, predictions, settings)


def _run_fold(
    dataset: TaskDataset,
    classes: np.ndarray,
    fold: int,
    n_splits: int,
    train: np.ndarray,
    test: np.ndarray,
    pred_all: np.ndarray,
    pred_shuf: np.ndarray,
    *,
    seed: int,
    C: float,
    max_iter: int,
    shuffled: bool,
) -> tuple[dict, list[dict]]:
    """Fit and score one fold (and its shuffled-label twin); fills ``pred_all``/``pred_shuf``
    at ``test``. Returns the fold's row and its per-task rows."""
    X, y, groups = dataset.X, dataset.y, dataset.groups
    overlap = np.intersect1d(groups[train], groups[test]).size
    if overlap:  # GroupKFold guarantees this; a broken splitter must not go unnoticed
        raise RuntimeError(f"fold {fold}: {overlap} texts on both sides of the split")
    try:
        probe = TaskProbe(C=C, max_iter=max_iter).fit(X[train], y[train])
    except ValueError as exc:
        raise ValueError(f"fold {fold} of {n_splits}: {exc}") from None
    pred = probe.predict(X[test])
    pred_all[test] = pred
    metrics, per_class = _fold_metrics(
        y[test], pred, _aligned_proba(probe, X[test], classes), classes
    )
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
    class_rows = []
    for c, (accuracy, auc, n) in per_class.items():
        entry = {"fold": fold, "task": c, "n_test": n, "accuracy": accuracy, "auc": auc}
        if shuffled:
            entry["shuffled_accuracy"], entry["shuffled_auc"], _ = shuffled_class[c]
        class_rows.append(entry)
    return row, class_rows


def _per_class(by_class: pd.DataFrame) -> pd.DataFrame:
    """Per task: total test rows and every metric as mean and SE over folds."""
    rows = []
    for c, part in by_class.groupby("task"):
        entry = {"task": int(c), "n_test": int(part["n_test"].sum())}
        for column in [col for col in part.columns if col not in ("fold", "task", "n_test")]:
            values = part[column].dropna()
            entry[f"{column}_mean"] = float(values.mean()) if len(values) else math.nan
            entry[f"{column}_se"] = (
                float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
            )
        rows.append(entry)
    return pd.DataFrame(rows)


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


__all__ = ["ProbeCV", "cross_validate_task_probe"]
