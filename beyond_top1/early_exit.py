"""Simulated token-level early exit (papers 001 and 004; docs/definitions.md, "Early exit").

**Simulation only: no compute is skipped.** Every position goes through one full forward pass;
:func:`collect_exit_signals` records, per position and layer, what each exit criterion reads,
and the criteria then pick the layer at which the position *would* have exited. The real thing,
a decoder that stops computing at the exit layer, is :mod:`beyond_top1.generation`.

Conventions. Layers ``0..L-1`` are ``blocks.{l}.hook_resid_post``. A position that exits after
block ``l`` uses ``l + 1`` layers and predicts the lens' top-1 at layer ``l``; a position whose
criterion never fires exits at ``L-1`` (uses ``L`` layers) and predicts the model's own top-1
(every lens is the identity at ``L-1``). Only positions with a gold next token are kept.

Criteria (``method``), each combined with a lens that makes the prediction it exits with:

* ``oracle``: exit at ``s_1`` **of the same lens** (the first layer of the final unbroken run in
  which that lens' top-1 equals the model's final top-1). Precision@1 = 1 by construction; the
  layers it uses are a floor for exit rules that must be right from the exit on.
* ``probe``: the first layer where a task probe (001) says the model is doing task ``>= 2``,
  i.e. the top-1 is settled. The probe is a :class:`~beyond_top1.probes.TaskProbe` or any
  object with ``predict(X[n, d_model]) -> task`` (1-based), applied to the ``resid_post`` of
  every layer (see :func:`probe_predict`). 001's rule, one point per probe.
* ``probe_conf``: the first layer where the probe's probability of task ``>= 2`` is ``>= θ``
  (needs ``predict_proba`` and ``classes_``, as :class:`~beyond_top1.probes.TaskProbe` has): the
  probe rule as a sweepable curve.
* ``margin``: the first layer where ``p_1 - p_2 >= θ`` under the lens (CALM's softmax
  confidence, as in 001's baseline).
* ``cosine``: the first layer where ``cos(h_l, h_{l-1}) >= θ`` (``h_{-1}`` = the embedding);
  CALM's hidden-state saturation. The lens only makes the prediction.
* ``confidence_004``: 004's rule (the early-exit rule of Schuster et al. 2022 as 004 uses it):
  exit at the first layer where ``p_1 - p_2 > λ_t`` under the lens, with the position-dependent
  threshold ``λ_t = 0.9 λ + 0.1 exp(-τ t / N)``, ``t`` the 0-based token position, ``τ = 4`` and
  ``N`` the mean of ``t + 1`` over the evaluated positions (004: "the average length of the
  input until position t"). Early positions need more confidence. 004 allows an exit after any
  block (its ``minimal_layer = 1`` counts the embedding as layer 0), as here.
* ``fixed``: every position exits at layer ``θ`` (static exit; 004's comparison).

Metrics per method, lens and θ: Precision@1 against the model's final top-1, accuracy against
the gold next token and the mean number of layers used. Every result owns its arrays (001's
public code let methods write into one shared prediction array).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from beyond_top1 import hooked
from beyond_top1.activations import stream_residuals
from beyond_top1.data import DEFAULT_SCORE_FIRST
from beyond_top1.fileio import output_folder
from beyond_top1.lenses import Lens, resolve_lens
from beyond_top1.ranking import PRECISIONS, lens_topk
from beyond_top1.saturation import saturation_layers

MARGIN_TOLERANCE = 1e-4  # bf16: margins less certain than this are read again in fp32
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


# ---------------------------------------------------------------------------------------------
# Signals: one streaming pass
# ---------------------------------------------------------------------------------------------


@dataclass
class ExitSignals:
    """What every criterion reads, per kept position ``n`` and layer ``L`` (numpy arrays).

    Attributes:
        text_id, pos, gold: text index, token position (index in the model input) and the gold
            next token of each position.
        final_ids: ``[n, 2]`` the model's final top-2 tokens.
        top1: per lens name, ``[n, L]`` the lens' top-1 at every layer.
        margin: per lens name, ``[n, L]`` ``p_1 - p_2`` under the lens.
        saturation: per lens name, ``[n, 2]`` ``s_1, s_2`` under the lens.
        resid_cos: ``[n, L]`` ``cos(h_l, h_{l-1})`` (``h_{-1}`` = the embedding).
        probe_task: ``[n, L]`` the probe's predicted task at every layer, or ``None``.
        probe_settled: ``[n, L]`` the probe's probability of task ``>= 2``, or ``None``.
    """

    n_layers: int
    text_id: Int[np.ndarray, " n"]
    pos: Int[np.ndarray, " n"]
    gold: Int[np.ndarray, " n"]
    final_ids: Int[np.ndarray, "n 2"]
    top1: dict[str, Int[np.ndarray, "n L"]]
    margin: dict[str, Float[np.ndarray, "n L"]]
    saturation: dict[str, Int[np.ndarray, "n 2"]]
    resid_cos: Float[np.ndarray, "n L"]
    probe_task: Int[np.ndarray, "n L"] | None = None
    probe_settled: Float[np.ndarray, "n L"] | None = None
    settings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.gold.shape[0])

    @property
    def lenses(self) -> tuple[str, ...]:
        return tuple(self.top1)

    @property
    def final_top1(self) -> Int[np.ndarray, " n"]:
        return self.final_ids[:, 0]

    def mean_input_length(self) -> float:
        """004's ``N``: the mean of ``t + 1`` over the positions."""
        return float(np.mean(self.pos + 1)) if len(self) else 1.0

    def __repr__(self) -> str:
        probe = "with probe" if self.probe_task is not None else "no probe"
        return (
            f"ExitSignals({len(self)} positions, L={self.n_layers}, lenses={list(self.lenses)}, "
            f"{probe})"
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``signals.npz`` and ``signals.json`` to ``directory`` (atomically; files of the
        same name that this toolkit did not write are refused)."""
        arrays = {
            "text_id": self.text_id,
            "pos": self.pos,
            "gold": self.gold,
            "final_ids": self.final_ids,
            "resid_cos": self.resid_cos,
        }
        for name in self.lenses:
            arrays[f"top1__{name}"] = self.top1[name]
            arrays[f"margin__{name}"] = self.margin[name]
            arrays[f"saturation__{name}"] = self.saturation[name]
        if self.probe_task is not None:
            arrays["probe_task"] = self.probe_task
        if self.probe_settled is not None:
            arrays["probe_settled"] = self.probe_settled
        meta = {"n_layers": self.n_layers, "lenses": list(self.lenses), "settings": self.settings}
        with output_folder(directory, "exit-signals") as folder:
            folder.write("signals.npz", functools.partial(_write_npz, arrays=arrays))
            folder.write_json("signals.json", meta)
        return folder.path


def _write_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as handle:  # a file object: numpy would append ".npz" to a name
        np.savez_compressed(handle, **arrays)


def load_exit_signals(directory: str | Path) -> ExitSignals:
    """Read what :meth:`ExitSignals.save` wrote."""
    folder = Path(directory)
    if not (folder / "signals.npz").is_file() or not (folder / "signals.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no signals.npz/signals.json; write them with ExitSignals.save"
        )
    meta = json.loads((folder / "signals.json").read_text())
    with np.load(folder / "signals.npz") as data:
        arrays = {key: data[key] for key in data.files}
    lenses = meta["lenses"]
    return ExitSignals(
        n_layers=int(meta["n_layers"]),
        text_id=arrays["text_id"],
        pos=arrays["pos"],
        gold=arrays["gold"],
        final_ids=arrays["final_ids"],
        top1={n: arrays[f"top1__{n}"] for n in lenses},
        margin={n: arrays[f"margin__{n}"] for n in lenses},
        saturation={n: arrays[f"saturation__{n}"] for n in lenses},
        resid_cos=arrays["resid_cos"],
        probe_task=arrays.get("probe_task"),
        probe_settled=arrays.get("probe_settled"),
        settings=meta.get("settings", {}),
    )


def _probe_inputs(probe, resid: Float[torch.Tensor, "n d_model"]) -> np.ndarray:
    """Raw ``resid_post`` rows as the probe's features (a TaskProbe trained on ``"rms"``
    features gets them divided by their RMS, as in training)."""
    x = resid.float().cpu()
    features = getattr(probe, "features", "raw")
    if isinstance(features, str) and features != "raw":
        from beyond_top1.probes import normalise_features

        x = normalise_features(x, features)
    return x.numpy()


def probe_predict(probe, resid: Float[torch.Tensor, "n d_model"]) -> Int[np.ndarray, " n"]:
    """Tasks (1-based) a probe predicts from raw ``resid_post`` rows (``probe.predict``)."""
    return np.asarray(probe.predict(_probe_inputs(probe, resid)))


def probe_settled_probability(
    probe, resid: Float[torch.Tensor, "n d_model"]
) -> Float[np.ndarray, " n"] | None:
    """The probe's probability of task ``>= 2`` (the top-1 is settled), or ``None`` if it has
    no ``predict_proba``/``classes_``."""
    if not (hasattr(probe, "predict_proba") and hasattr(probe, "classes_")):
        return None
    proba = np.asarray(probe.predict_proba(_probe_inputs(probe, resid)))
    return proba[:, np.asarray(probe.classes_) >= 2].sum(axis=1)


def _probe_signals(probe, resid: Float[torch.Tensor, "tokens layer d_model"]):
    tokens, layers, d = resid.shape
    flat = resid.reshape(tokens * layers, d)
    tasks = probe_predict(probe, flat).reshape(tokens, layers).astype(np.int16)
    settled = probe_settled_probability(probe, flat)
    if settled is not None:
        settled = settled.reshape(tokens, layers).astype(np.float32)
    return tasks, settled


def collect_exit_signals(
    model,
    texts: Iterable[str],
    lenses: Mapping[str, Lens] | None = None,
    *,
    probe=None,
    batch_size: int = 8,
    max_len: int | None = None,
    precision: str = "fp32",
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> ExitSignals:
    """One streaming pass over ``texts`` recording every criterion's per-layer signal.

    Args:
        lenses: name -> lens (default ``{"logit": LogitLens(model)}``); each gives a top-1, a
            ``p_1 - p_2`` margin and ``s_1, s_2`` at every layer (``lens_topk`` with ``k = 2``).
        probe: optional task probe with ``predict(X[n, d_model]) -> task (1-based)``.
        precision: ``"fp32"`` or ``"bf16"``: the same top-2 ids either way (see
            :mod:`beyond_top1.ranking`). A margin rests on the log-normaliser, which bf16
            bounds only to ~0.02 nats: positions whose margin bound
            ``(p_1 + p_2)(e^{err} - 1)`` exceeds ``MARGIN_TOLERANCE`` at some layer are read
            again in fp32.
        score_first: score position 0 of a model without BOS (see :mod:`beyond_top1.data`).

    Returns:
        :class:`ExitSignals` over positions that have a gold next token.
    """
    lenses = {
        name: resolve_lens(model, lens, name=f"lens {name!r}")
        for name, lens in (dict(lenses) if lenses else {"logit": None}).items()
    }
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    L = hooked.n_layers(model)
    parts: dict[str, list[np.ndarray]] = {}

    def add(key: str, value) -> None:
        parts.setdefault(key, []).append(value)

    n_texts = 0
    batches = stream_residuals(
        model,
        texts,
        layers=(-1, *range(L)),
        batch_size=batch_size,
        max_len=max_len,
        progress=progress,
        score_first=score_first,
    )
    n_reread = 0
    for batch in batches:
        keep = batch.next_token_ids >= 0
        if not bool(keep.any()):
            continue
        resid = batch.resid[keep]  # [T, L+1, d]: embedding, then resid_post 0..L-1
        n_texts = max(n_texts, int(batch.text_ids.max()) + 1)
        add("text_id", batch.text_ids[keep].cpu().numpy().astype(np.int64))
        add("pos", batch.positions[keep].cpu().numpy().astype(np.int64))
        add("gold", batch.next_token_ids[keep].cpu().numpy().astype(np.int64))
        final_ids = None
        for name, lens in lenses.items():
            readout = lens_topk(lens, resid[:, 1:], tuple(range(L)), 2, precision=precision)
            probs = readout.top_logprobs.double().exp()
            margin = probs[..., 0] - probs[..., 1]
            bound = probs.sum(-1) * torch.expm1(readout.logprob_error.double())
            loose = (bound > MARGIN_TOLERANCE).any(-1).nonzero().squeeze(-1)
            if readout.precision == "bf16" and len(loose):
                again = lens_topk(lens, resid[loose, 1:], tuple(range(L)), 2, precision="fp32")
                exact = again.top_logprobs.double().exp()
                margin[loose] = exact[..., 0] - exact[..., 1]
                n_reread += len(loose)
            add(f"top1__{name}", readout.top_ids[..., 0].cpu().numpy().astype(np.int64))
            add(f"margin__{name}", margin.cpu().numpy())
            s = saturation_layers(readout.top_ids)
            add(f"saturation__{name}", s.cpu().numpy().astype(np.int64))
            if final_ids is None:
                final_ids = readout.final_ids.cpu().numpy().astype(np.int64)
        add("final_ids", final_ids)
        with torch.inference_mode():
            cos = torch.nn.functional.cosine_similarity(
                resid[:, 1:].float(), resid[:, :-1].float(), dim=-1
            )
        add("resid_cos", cos.cpu().numpy().astype(np.float32))
        if probe is not None:
            tasks, settled = _probe_signals(probe, resid[:, 1:])
            add("probe_task", tasks)
            if settled is not None:
                add("probe_settled", settled)
    if "gold" not in parts:
        raise ValueError("the texts have no position with a next token; give longer texts")

    def cat(key: str) -> np.ndarray:
        return np.concatenate(parts[key])

    return ExitSignals(
        n_layers=L,
        text_id=cat("text_id"),
        pos=cat("pos"),
        gold=cat("gold"),
        final_ids=cat("final_ids"),
        top1={n: cat(f"top1__{n}") for n in lenses},
        margin={n: cat(f"margin__{n}").astype(np.float32) for n in lenses},
        saturation={n: cat(f"saturation__{n}") for n in lenses},
        resid_cos=cat("resid_cos"),
        probe_task=cat("probe_task") if probe is not None else None,
        probe_settled=cat("probe_settled") if "probe_settled" in parts else None,
        settings={
            "model_name": hooked.model_name(model),
            "lenses": {n: lens.kind for n, lens in lenses.items()},
            "precision": precision,
            "positions_reread_in_fp32": n_reread,
            "batch_size": batch_size,
            "max_len": max_len,
            "score_first": bool(score_first),
            "n_texts": n_texts,
            "probe": type(probe).__name__ if probe is not None else None,
        },
    )


def with_probe(
    signals: ExitSignals,
    model,
    texts: Iterable[str],
    probe,
    *,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = True,
) -> ExitSignals:
    """``signals`` with the probe's per-layer predictions recomputed for another ``probe``.

    Only a forward pass (no lens read-outs): trying a new probe costs a fraction of
    :func:`collect_exit_signals`. ``texts``, ``batch_size`` and ``max_len`` must be those the
    signals were collected with (checked position by position).
    """
    L = signals.n_layers
    tasks, settled, keys = [], [], []
    batches = stream_residuals(
        model,
        texts,
        layers=tuple(range(L)),
        batch_size=batch_size,
        max_len=max_len,
        progress=progress,
        score_first=bool(signals.settings.get("score_first", True)),  # older signals scored it
    )
    for batch in batches:
        keep = batch.next_token_ids >= 0
        if not bool(keep.any()):
            continue
        t, p = _probe_signals(probe, batch.resid[keep])
        tasks.append(t)
        if p is not None:
            settled.append(p)
        keys.append(
            np.stack(
                [batch.text_ids[keep].cpu().numpy(), batch.positions[keep].cpu().numpy()], axis=1
            )
        )
    keys = np.concatenate(keys) if keys else np.zeros((0, 2), dtype=np.int64)
    if keys.shape[0] != len(signals) or not np.array_equal(
        keys, np.stack([signals.text_id, signals.pos], axis=1)
    ):
        raise ValueError(
            "these texts/batch settings do not give the positions the signals were collected "
            "on; pass the same texts, batch_size and max_len"
        )
    return replace(
        signals,
        probe_task=np.concatenate(tasks),
        probe_settled=np.concatenate(settled) if settled else None,
        settings={**signals.settings, "probe": type(probe).__name__},
    )


# ---------------------------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------------------------


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


def early_exit_curves(
    signals: ExitSignals,
    methods: Sequence[str] | None = None,
    lenses: Sequence[str] | None = None,
    thetas: Mapping[str, Sequence[float]] | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Precision@1, accuracy and mean layers for every method × lens × θ (one row each).

    Includes a ``full`` row (no exit). ``cosine``, ``probe`` and ``probe_conf`` decide without
    the lens, so they appear once per lens (the lens only makes the prediction). The probe
    methods are skipped when the signals have no probe predictions (probabilities).
    """
    L = signals.n_layers
    methods = tuple(methods) if methods else METHODS
    lenses = tuple(lenses) if lenses else signals.lenses
    grid = default_thetas(L)
    grid.update({k: np.asarray(v, dtype=float) for k, v in (thetas or {}).items()})
    rows = [
        {
            "method": "full",
            "lens": "-",
            "theta": None,
            "precision_at_1": 1.0,
            "accuracy": float(np.mean(signals.final_top1 == signals.gold)),
            "mean_layers": float(L),
            "fraction_saved": 0.0,
            "n": len(signals),
        }
    ]
    for method in methods:
        if method == "probe" and signals.probe_task is None:
            continue
        if method == "probe_conf" and signals.probe_settled is None:
            continue
        for lens in lenses:
            values = grid[method] if method in THRESHOLD_METHODS else [None]
            for theta in values:
                rows.append(simulate_exit(signals, method, lens, theta, **kwargs).row())
    return pd.DataFrame(rows)


def layers_saved_table(
    curves: pd.DataFrame, targets: Sequence[float] = (0.95, 0.99)
) -> pd.DataFrame:
    """ "Fraction of layers saved at X% Precision@1" per method and lens.

    For each target the best grid point is taken (no interpolation): among the θ whose
    Precision@1 reaches the target, the one with the fewest mean layers. NaN when no θ does.
    """
    L = float(curves.loc[curves["method"] == "full", "mean_layers"].iloc[0])
    rows = []
    for (method, lens), group in curves[curves["method"] != "full"].groupby(
        ["method", "lens"], sort=False
    ):
        row = {"method": method, "lens": lens}
        for target in targets:
            tag = f"{round(100 * target):d}"
            ok = group[group["precision_at_1"] >= target]
            if len(ok):
                best = ok.sort_values(["mean_layers", "precision_at_1"], ascending=[True, False])
                best = best.iloc[0]
                row[f"saved_at_{tag}"] = 1.0 - best["mean_layers"] / L
                row[f"theta_at_{tag}"] = best["theta"]
                row[f"accuracy_at_{tag}"] = best["accuracy"]
                row[f"precision_at_{tag}"] = best["precision_at_1"]
            else:
                row[f"saved_at_{tag}"] = math.nan
                row[f"theta_at_{tag}"] = math.nan
                row[f"accuracy_at_{tag}"] = math.nan
                row[f"precision_at_{tag}"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def best_at_budget(curves: pd.DataFrame, max_layers: float, metric: str = "precision_at_1"):
    """Per method and lens, the grid point with the best ``metric`` among those using at most
    ``max_layers`` layers on average (to compare a single-point rule, e.g. ``probe``, with the
    threshold curves at the same compute)."""
    rows = curves[(curves["method"] != "full") & (curves["mean_layers"] <= max_layers + 1e-9)]
    if rows.empty:
        return rows.copy()
    best = rows.sort_values([metric, "mean_layers"], ascending=[False, True])
    return best.groupby(["method", "lens"], sort=False).head(1).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Saturation for better language modeling (001)
# ---------------------------------------------------------------------------------------------


def two_proportion_ztest(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z-test of ``x1/n1`` vs ``x2/n2``: ``(z, two-sided p)``."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return math.nan, math.nan
    z = (p1 - p2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class BetterLMResult:
    """001's "saturation for better language modeling" test.

    Among positions whose final top-1 is not the gold token: how often the final rank-2 token
    is the gold token, for positions whose rank 2 saturated early (``s_2 <= L-1-m``) vs. only at
    the last layer (``s_2 = L-1``); pooled two-proportion z-test (two-sided).
    """

    n_early: int
    correct_early: int
    n_late: int
    correct_late: int
    z: float
    p_value: float
    m: int
    n_layers: int
    n_top1_wrong: int
    lens: str

    @property
    def rate_early(self) -> float:
        return self.correct_early / self.n_early if self.n_early else math.nan

    @property
    def rate_late(self) -> float:
        return self.correct_late / self.n_late if self.n_late else math.nan

    def to_dict(self) -> dict:
        return {
            "n_top1_wrong": self.n_top1_wrong,
            "n_early": self.n_early,
            "correct_early": self.correct_early,
            "rate_early": self.rate_early,
            "n_late": self.n_late,
            "correct_late": self.correct_late,
            "rate_late": self.rate_late,
            "z": self.z,
            "p_value": self.p_value,
            "m": self.m,
            "early_means": f"s_2 <= {self.n_layers - 1 - self.m}",
            "late_means": f"s_2 = {self.n_layers - 1}",
            "lens": self.lens,
        }

    def summary(self) -> str:
        return (
            f"top-1 wrong at {self.n_top1_wrong} positions; rank-2 token is gold at "
            f"{self.rate_early:.1%} of {self.n_early} with early "
            f"s_2 <= {self.n_layers - 1 - self.m} vs {self.rate_late:.1%} of {self.n_late} "
            f"with s_2 = {self.n_layers - 1}; "
            f"z = {self.z:.2f}, p = {self.p_value:.2g}"
        )

    def __repr__(self) -> str:
        return f"BetterLMResult({self.summary()})"


def better_language_modeling(
    signals: ExitSignals, m: int = DEFAULT_BETTER_LM_MARGIN, lens: str = "logit"
) -> BetterLMResult:
    """001's test (see :class:`BetterLMResult`); ``s_2`` is read under ``lens``."""
    L = signals.n_layers
    if not 0 <= m < L - 1:
        raise ValueError(f"m must be in [0, {L - 2}], got {m}")
    wrong = signals.final_top1 != signals.gold
    second_right = signals.final_ids[:, 1] == signals.gold
    s2 = signals.saturation[lens][:, 1]
    early = wrong & (s2 <= L - 1 - m)
    late = wrong & (s2 == L - 1)
    x1, n1 = int((early & second_right).sum()), int(early.sum())
    x2, n2 = int((late & second_right).sum()), int(late.sum())
    z, p = two_proportion_ztest(x1, n1, x2, n2)
    return BetterLMResult(n1, x1, n2, x2, z, p, m, L, int(wrong.sum()), lens)


__all__ = [
    "METHODS",
    "BetterLMResult",
    "ExitResult",
    "ExitSignals",
    "best_at_budget",
    "better_language_modeling",
    "collect_exit_signals",
    "confidence_threshold_004",
    "default_thetas",
    "early_exit_curves",
    "exit_layers",
    "first_firing_layer",
    "layers_saved_table",
    "load_exit_signals",
    "probe_predict",
    "probe_settled_probability",
    "simulate_exit",
    "two_proportion_ztest",
    "with_probe",
]
