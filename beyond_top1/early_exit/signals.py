"""Early-exit signals: what every criterion reads, per position and layer, derived from one
scan (see :mod:`beyond_top1.early_exit`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from beyond_top1.activations import stream_residuals
from beyond_top1.data import DEFAULT_SCORE_FIRST
from beyond_top1.fileio import output_folder
from beyond_top1.lenses import Lens
from beyond_top1.probes import apply_probe
from beyond_top1.ranking import PRECISIONS
from beyond_top1.saturation import saturation_layers
from beyond_top1.scans import ScanResult, scan


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

    @classmethod
    def from_scan(cls, result: ScanResult) -> ExitSignals:
        """The signals of every lens a scan read (``k >= 2``), at its positions that have a
        gold next token. The scan's probe predictions, if any, come along."""
        if result.k < 2:
            raise ValueError("early-exit signals need a scan with k >= 2 (the margin p_1 - p_2)")
        frame = result.saturation
        keep = frame["next_token_id"].to_numpy() >= 0
        top1, margin, saturation = {}, {}, {}
        for name in result.lens_names:
            arrays = result.lens_arrays(name)
            top_ids = arrays["top_ids"][keep]
            top1[name] = top_ids[..., 0].astype(np.int64)
            probs = arrays["top_logprobs"][keep][..., :2].astype(np.float64)
            probs = np.exp(probs)
            margin[name] = (probs[..., 0] - probs[..., 1]).astype(np.float32)
            s = saturation_layers(top_ids[..., :2]).numpy()
            saturation[name] = s.astype(np.int64)
        settings = result.settings
        first = result.lens_names[0]
        kinds = settings.get("lens_kinds") or {first: settings.get("lens_kind", first)}
        return cls(
            n_layers=result.n_layers,
            text_id=frame["text_id"].to_numpy()[keep].astype(np.int64),
            pos=frame["pos"].to_numpy()[keep].astype(np.int64),
            gold=frame["next_token_id"].to_numpy()[keep].astype(np.int64),
            final_ids=result.top_ids[keep][:, -1, :2].astype(np.int64),
            top1=top1,
            margin=margin,
            saturation=saturation,
            resid_cos=result.resid_cos[keep],
            probe_task=None if result.probe_task is None else result.probe_task[keep],
            probe_settled=None if result.probe_settled is None else result.probe_settled[keep],
            settings={
                "model_name": settings.get("model_name"),
                "lenses": {name: kinds.get(name, name) for name in result.lens_names},
                "precision": settings.get("precision"),
                "rows_reread_in_fp32": result.info.get(
                    "rows_reread_in_fp32", result.info.get("positions_reread_in_fp32", 0)
                ),  # (scans saved before rows were counted: positions, each of L rows)
                "batch_size": settings.get("batch_size"),
                "max_len": settings.get("max_len"),
                "score_first": settings.get("score_first"),
                "n_texts": int(frame["text_id"].max()) + 1 if len(frame) else 0,
                "probe": settings.get("probe"),
            },
        )

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
    """Every criterion's per-layer signal for ``texts``: a ``k = 2`` scan through ``lenses``
    (default: the logit lens), then :meth:`ExitSignals.from_scan`.

    Args:
        lenses: name -> lens; each gives a top-1, a ``p_1 - p_2`` margin and ``s_1, s_2`` at
            every layer.
        probe: optional task probe with ``predict(X[n, d_model]) -> task (1-based)``.
        precision: ``"fp32"`` or ``"bf16"``: the same top-2 ids either way. A margin rests on
            the log-normaliser, which bf16 bounds only to ~0.02 nats: the scan reads positions
            whose margin bound exceeds :data:`~beyond_top1.scans.MARGIN_TOLERANCE` again in fp32.
        score_first: score position 0 of a model without BOS (see :mod:`beyond_top1.data`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    result = scan(
        model,
        texts,
        lens=dict(lenses) if lenses else None,
        k=2,
        batch_size=batch_size,
        max_len=max_len,
        precision=precision,
        probe=probe,
        progress=progress,
        score_first=score_first,
    )
    signals = ExitSignals.from_scan(result)
    if len(signals) == 0:
        raise ValueError("the texts have no position with a next token; give longer texts")
    return signals


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

    A forward pass only (no lens read-outs; :func:`~beyond_top1.probes.apply_probe` on the
    streamed residuals): trying a new probe costs a fraction of a scan. ``texts``,
    ``batch_size`` and ``max_len`` must be those the signals were collected with (checked
    position by position).
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
        t, p = apply_probe(probe, batch.resid[keep])
        tasks.append(t)
        if p is not None:
            settled.append(p)
        ids = [batch.text_ids[keep].cpu().numpy(), batch.positions[keep].cpu().numpy()]
        keys.append(np.stack(ids, axis=1))
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


__all__ = ["ExitSignals", "collect_exit_signals", "load_exit_signals", "with_probe"]
