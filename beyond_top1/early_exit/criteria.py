"""Exit criteria of the simulation: at which layer each position exits, and what that costs
and gets right (see :mod:`beyond_top1.early_exit`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Int

from beyond_top1.early_exit.signals import ExitSignals

METHODS = ("oracle", "probe", "probe_conf", "margin", "cosine", "confidence_004", "fixed")
THRESHOLD_METHODS = ("probe_conf", "margin", "cosine", "confidence_004", "fixed")
TAU_004 = 4.0
DEFAULT_BETTER_LM_MARGIN = 6  # 001's code: "early" means s_2 <= L - 7


def default_thetas(n_layers: int) -> dict[str, np.ndarray]:
    """θ grids per method: fine near the high-precision end, where the 95%/99% points lie."""
    fine = np.array([0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 0.99999, 1.0])
    return {
        "probe_conf": np.unique(np.concatenate([np.linspace(0.1, 0.98, 45), fine])),
        "margin": np.unique(np.concatenate([np.linspace(0.0, 0.98, 50), fine])),
        "cosine": np.unique(np.concatenate([np.linspace(0.5, 0.98, 25), fine])),
        # 004 sweeps λ over [0, 1] and up to 1.112 (λ_t > 1 for every t: never exit); the
        # high-precision end needs 0.9 λ close to 1, so λ is also taken at 0.9 λ = fine values.
        "confidence_004": np.unique(
            np.concatenate([np.linspace(0.0, 1.1, 56), fine / 0.9, [1.112]])
        ),
        "fixed": np.arange(n_layers, dtype=float),
    }


def first_firing_layer(fires: np.ndarray) -> Int[np.ndarray, " n"]:
    """The first layer where ``fires[n, l]`` is true; ``L-1`` (no exit) where it never is."""
    fires = np.asarray(fires, dtype=bool)
    L = fires.shape[1]
    first = np.argmax(fires, axis=1)
    return np.where(fires.any(axis=1), first, L - 1).astype(np.int64)


def confidence_threshold_004(
    lam: float, positions, n_avg: float, tau: float = TAU_004
) -> np.ndarray:
    """004's position-dependent threshold ``λ_t = 0.9 λ + 0.1 exp(-τ t / N)``."""
    t = np.asarray(positions, dtype=np.float64)
    return 0.9 * lam + 0.1 * np.exp(-tau * t / n_avg)


def exit_layers(
    signals: ExitSignals,
    method: str,
    lens: str = "logit",
    theta: float | None = None,
    *,
    n_avg: float | None = None,
    tau: float = TAU_004,
    min_layer: int = 0,
) -> Int[np.ndarray, " n"]:
    """The layer (``0..L-1``) at which each position exits under ``method`` (see module doc).

    ``lens`` matters for ``oracle``, ``margin`` and ``confidence_004`` (whose signal it gives);
    ``theta`` is required for the threshold methods; ``n_avg`` is 004's ``N`` (default: from
    the positions). ``min_layer``: the criterion is only checked from this layer on (as the
    decoder's ``min_layer``; not applied to ``oracle`` and ``fixed``).
    """
    if not 0 <= min_layer < signals.n_layers:
        raise ValueError(f"min_layer must be in [0, {signals.n_layers - 1}], got {min_layer}")
    L = signals.n_layers
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if lens not in signals.top1:
        raise KeyError(f"no lens {lens!r} in these signals; have {list(signals.lenses)}")
    if method in THRESHOLD_METHODS and theta is None:
        raise ValueError(f"method {method!r} needs a threshold theta")
    if method == "oracle":
        return signals.saturation[lens][:, 0].astype(np.int64)
    if method == "probe":
        if signals.probe_task is None:
            raise ValueError("these signals have no probe predictions; pass probe= when collecting")
        fires = signals.probe_task >= 2
    elif method == "probe_conf":
        if signals.probe_settled is None:
            raise ValueError(
                "these signals have no probe probabilities; collect them with a probe that has "
                "predict_proba and classes_"
            )
        fires = signals.probe_settled >= theta
    elif method == "margin":
        fires = signals.margin[lens] >= theta
    elif method == "cosine":
        fires = signals.resid_cos >= theta
    elif method == "confidence_004":
        n_avg = signals.mean_input_length() if n_avg is None else n_avg
        threshold = confidence_threshold_004(theta, signals.pos, n_avg, tau)
        fires = signals.margin[lens] > threshold[:, None]
    if method != "fixed":
        fires[:, :min_layer] = False  # every branch above made a fresh array
        return first_firing_layer(fires)
    layer = int(theta)  # fixed
    if not 0 <= layer < L:
        raise ValueError(f"fixed exit layer must be in [0, {L - 1}], got {theta}")
    return np.full(len(signals), layer, dtype=np.int64)


@dataclass
class ExitResult:
    """One method's exits: its own ``exit_layer`` and ``prediction`` arrays."""

    method: str
    lens: str
    theta: float | None
    exit_layer: Int[np.ndarray, " n"]
    prediction: Int[np.ndarray, " n"]
    precision_at_1: float
    accuracy: float
    mean_layers: float
    n_layers: int

    @property
    def fraction_saved(self) -> float:
        return 1.0 - self.mean_layers / self.n_layers

    def row(self) -> dict:
        return {
            "method": self.method,
            "lens": self.lens,
            "theta": self.theta,
            "precision_at_1": self.precision_at_1,
            "accuracy": self.accuracy,
            "mean_layers": self.mean_layers,
            "fraction_saved": self.fraction_saved,
            "n": int(self.prediction.shape[0]),
        }

    def __repr__(self) -> str:
        theta = "" if self.theta is None else f", θ={self.theta:g}"
        return (
            f"ExitResult({self.method}/{self.lens}{theta}: P@1={self.precision_at_1:.4f}, "
            f"acc={self.accuracy:.4f}, layers={self.mean_layers:.2f}/{self.n_layers})"
        )


def simulate_exit(
    signals: ExitSignals,
    method: str,
    lens: str = "logit",
    theta: float | None = None,
    **kwargs,
) -> ExitResult:
    """Exit layers, predictions and metrics of one method (arrays are freshly allocated)."""
    layers = exit_layers(signals, method, lens, theta, **kwargs)
    rows = np.arange(len(signals))
    prediction = np.array(signals.top1[lens][rows, layers], dtype=np.int64, copy=True)
    return ExitResult(
        method=method,
        lens=lens,
        theta=None if theta is None else float(theta),
        exit_layer=np.array(layers, dtype=np.int64, copy=True),
        prediction=prediction,
        precision_at_1=float(np.mean(prediction == signals.final_top1)),
        accuracy=float(np.mean(prediction == signals.gold)),
        mean_layers=float(np.mean(layers + 1)),
        n_layers=signals.n_layers,
    )


__all__ = [
    "DEFAULT_BETTER_LM_MARGIN",
    "METHODS",
    "THRESHOLD_METHODS",
    "ExitResult",
    "confidence_threshold_004",
    "default_thetas",
    "exit_layers",
    "first_firing_layer",
    "simulate_exit",
]
