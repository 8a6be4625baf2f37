"""Rank trajectories and saturation events over a corpus, streamed (000/001; docs/definitions.md).

:func:`scan` runs texts through a model and a lens batch by batch and keeps, per scored position,
only compact results: the final top-k ids, the lens' top-k ids and log-probs at every layer, the
rank of each final top-k token at every layer, the hidden-state cosine between consecutive layers,
the saturation layers ``s_1..s_k``, the gold next token and text/position indices. Nothing of size
``[tokens, layers, vocab]`` outlives one layer of one batch.

With ``out=DIR`` the scan writes one shard per ``shard_batches`` batches (atomically), so an
interrupted run continues with ``resume=True`` without redoing finished shards, and at the end
writes ``saturation.parquet``, ``trajectories.safetensors`` and ``summary.json``
(:func:`save_scan`). Re-running with the same arguments writes identical files.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors
import safetensors.numpy
import torch
from jaxtyping import Float, Int

from beyond_top1 import hooked
from beyond_top1.activations import stream_residuals
from beyond_top1.data import DEFAULT_SCORE_FIRST, check_batch_size, resolve_max_len, text_list
from beyond_top1.fileio import OutputFolder, atomic_write_bytes, output_folder
from beyond_top1.lenses import Lens, resolve_lens
from beyond_top1.ranking import DEFAULT_CANDIDATES, PRECISIONS, lens_topk
from beyond_top1.saturation import (
    DEFAULT_FILTER_FRACTION,
    DEFAULT_PERMUTATIONS,
    OrderingStats,
    ordering,
    saturation_layers,
)

SATURATION_FILE = "saturation.parquet"
TRAJECTORIES_FILE = "trajectories.safetensors"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "settings.json"
SHARDS_DIR = "shards"
FINAL_FILES = (SATURATION_FILE, TRAJECTORIES_FILE, SUMMARY_FILE)
TRAJECTORY_FIELDS = ("top_ids", "final_ranks", "top_logprobs", "resid_cos")


class ScanFileError(ValueError):
    """A scan folder is missing, corrupt, or was written with other settings."""


@dataclass
class ScanResult:
    """Compact per-position results of :func:`scan`; ``n`` = scored positions.

    Attributes:
        saturation: one row per position: ``text_id, pos, token_id, next_token_id`` (``-1`` at
            a text's last token), ``top_1_id..top_k_id`` (the final top-k), ``s_1..s_k``.
        top_ids: ``[n, L, k]`` the lens' top-k ids at every layer (rank order).
        final_ranks: ``[n, L, k]`` rank (1-based) of final token ``i`` at every layer.
        top_logprobs: ``[n, L, k]`` log-probs of ``top_ids`` under the lens.
        resid_cos: ``[n, L]`` ``cos(h_l, h_{l-1})`` (``h_{-1}`` = the embedding).
        settings: how the scan was made (model, lens, k, precision, texts...).
    """

    saturation: pd.DataFrame
    top_ids: Int[np.ndarray, "n layer k"]
    final_ranks: Int[np.ndarray, "n layer k"]
    top_logprobs: Float[np.ndarray, "n layer k"]
    resid_cos: Float[np.ndarray, "n layer"]
    settings: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.top_ids.shape[1])

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[2])

    def __len__(self) -> int:
        return len(self.saturation)

    def saturation_array(self) -> Int[np.ndarray, "n k"]:
        """``s_1..s_k`` as an ``[n, k]`` integer array."""
        return self.saturation[[f"s_{i}" for i in range(1, self.k + 1)]].to_numpy()

    def ordering(self, **kwargs) -> OrderingStats:
        """001's ordering statistics (see :func:`beyond_top1.saturation.ordering`)."""
        return ordering(torch.tensor(self.saturation_array()), self.n_layers, **kwargs)

    def subset(self, rows: np.ndarray) -> ScanResult:
        """The positions selected by a boolean mask or index array."""
        rows = np.asarray(rows)
        return ScanResult(
            self.saturation.iloc[rows].reset_index(drop=True),
            self.top_ids[rows],
            self.final_ranks[rows],
            self.top_logprobs[rows],
            self.resid_cos[rows],
            dict(self.settings),
        )

    def save(self, directory: str | Path) -> Path:
        return save_scan(self, directory)

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"ScanResult({len(self)} positions, {s.get('n_texts', '?')} texts, "
            f"model={s.get('model_name')!r}, lens={s.get('lens')!r}, k={self.k}, "
            f"L={self.n_layers})"
        )

    def _repr_html_(self) -> str:
        head = self.saturation.head(10).to_html(index=False)
        return f"<div><b>{self!r}</b>{head}</div>"


# ---------------------------------------------------------------------------------------------
# One batch
# ---------------------------------------------------------------------------------------------


def _scan_batch(batch, lens: Lens, k: int, precision: str, n_candidates: int) -> dict:
    """Compact numpy results for one :class:`~beyond_top1.activations.ResidualBatch`."""
    L = lens.n_layers
    resid = batch.resid  # [T, L+1, d]: embedding, then resid_post 0..L-1
    readout = lens_topk(
        lens, resid[:, 1:], tuple(range(L)), k, precision=precision, n_candidates=n_candidates
    )
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(
            resid[:, 1:].float(), resid[:, :-1].float(), dim=-1
        )
    s = saturation_layers(readout.top_ids)
    return {
        "text_id": batch.text_ids.cpu().numpy().astype(np.int64),
        "pos": batch.positions.cpu().numpy().astype(np.int64),
        "token_id": batch.token_ids.cpu().numpy().astype(np.int64),
        "next_token_id": batch.next_token_ids.cpu().numpy().astype(np.int64),
        "saturation": s.cpu().numpy().astype(np.int16),
        "top_ids": readout.top_ids.cpu().numpy().astype(np.int32),
        "final_ranks": readout.final_ranks.clamp_max(2**31 - 1).cpu().numpy().astype(np.int32),
        "top_logprobs": readout.top_logprobs.cpu().numpy().astype(np.float32),
        "resid_cos": cos.cpu().numpy().astype(np.float32),
    }


def _assemble(parts: list[dict], k: int, n_layers: int, settings: dict) -> ScanResult:
    def cat(key, shape):
        arrays = [p[key] for p in parts]
        return np.concatenate(arrays) if arrays else np.zeros(shape, dtype=np.float32)

    top_ids = cat("top_ids", (0, n_layers, k)).astype(np.int32)
    s = cat("saturation", (0, k)).astype(np.int64)
    frame = pd.DataFrame(
        {
            "text_id": cat("text_id", (0,)).astype(np.int64),
            "pos": cat("pos", (0,)).astype(np.int64),
            "token_id": cat("token_id", (0,)).astype(np.int64),
            "next_token_id": cat("next_token_id", (0,)).astype(np.int64),
        }
    )
    for i in range(k):
        frame[f"top_{i + 1}_id"] = top_ids[:, -1, i].astype(np.int64)
    for i in range(k):
        frame[f"s_{i + 1}"] = s[:, i]
    return ScanResult(
        saturation=frame,
        top_ids=top_ids,
        final_ranks=cat("final_ranks", (0, n_layers, k)).astype(np.int32),
        top_logprobs=cat("top_logprobs", (0, n_layers, k)).astype(np.float32),
        resid_cos=cat("resid_cos", (0, n_layers)).astype(np.float32),
        settings=settings,
    )


# ---------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------


def texts_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 over the texts (order matters): ties a scan folder to its inputs."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def _lens_name(lens: Lens, lens_source: str | None) -> str:
    return lens_source or lens.kind


def scan(
    model,
    texts: Iterable[str],
    *,
    lens: Lens | str | Path | None = None,
    k: int = 5,
    batch_size: int = 8,
    max_len: int | None = None,
    precision: str = "fp32",
    n_candidates: int = DEFAULT_CANDIDATES,
    out: str | Path | None = None,
    resume: bool = False,
    shard_batches: int = 4,
    lens_source: str | None = None,
    texts_description: str | None = None,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> ScanResult:
    """Rank trajectories and saturation layers for every scored position of ``texts``.

    Args:
        model: a ``HookedTransformer``.
        texts: strings (materialised once to fingerprint them).
        lens: how layers are read: a :class:`~beyond_top1.lenses.Lens` of ``model``,
            ``"logit"`` (the default) or a saved lens folder.
        k: ranks tracked; ``s_1..s_k`` are computed (``1 <= k <= vocab``).
        batch_size, max_len: texts per forward pass; tokens per text (default 128).
        precision: which GEMM proposes candidates, ``"fp32"`` or ``"bf16"``: the exact rule
            gives the same top-k ids, ranks within ``k`` and saturation layers either way;
            ranks beyond ``k`` and log-probs carry the bounds of :mod:`beyond_top1.ranking`.
        out: a folder to write shards and final files to (resumable; see module docstring).
        resume: continue an interrupted run in ``out`` (settings must match).
        lens_source: how the lens was given (e.g. its folder), recorded in the settings.
        texts_description: how the texts were chosen, recorded in the settings.
        n_permutations: permutations of the ordering null written to ``summary.json``.
        score_first: score position 0 of a model without BOS (default: not; it is the
            attention sink, see :mod:`beyond_top1.data`).

    Returns:
        A :class:`ScanResult`.
    """
    lens = resolve_lens(model, lens)
    texts = text_list(texts)
    vocab = hooked.d_vocab(model)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if shard_batches < 1:
        raise ValueError(f"shard_batches must be >= 1, got {shard_batches}")
    check_batch_size(batch_size)
    settings = {
        "model_name": hooked.model_name(model),
        "unembedding_fingerprint": hooked.unembedding_fingerprint(model),
        "n_layers": hooked.n_layers(model),
        "lens": _lens_name(lens, lens_source),
        "lens_kind": lens.kind,
        "k": k,
        "precision": precision,
        "n_candidates": n_candidates if precision == "bf16" else None,
        "batch_size": batch_size,
        "max_len": resolve_max_len(model, max_len),
        "n_texts": len(texts),
        "texts": texts_description,
        "texts_sha256": texts_fingerprint(texts),
        "shard_batches": shard_batches,
        "score_first": bool(score_first),
    }
    run = functools.partial(
        _run_scan, model, texts, lens, settings, progress=progress, n_candidates=n_candidates
    )
    if out is None:
        return run(store=None)[0]
    with OutputFolder(out, SCAN_KIND, adopt=_legacy_scan_files(Path(out))) as folder:
        store = _ShardStore(folder, settings, resume)
        if store.complete:
            return load_scan(folder.path)
        result, timing = run(store=store)
        save_scan(result, folder, n_permutations=n_permutations)
        store.finish(timing)
    return result


def _run_scan(model, texts, lens, settings, *, store, progress, n_candidates):
    """The scan loop: every batch read once, shards written (and skipped) through ``store``."""
    L, k, shard_batches = settings["n_layers"], settings["k"], settings["shard_batches"]
    parts = store.completed_prefix() if store else []  # finished shards are never recomputed
    start = time.perf_counter()
    n_tokens = 0
    pending: list[dict] = []
    batches = stream_residuals(
        model,
        texts,
        layers=(-1, *range(L)),
        batch_size=settings["batch_size"],
        max_len=settings["max_len"],
        skip_batches=len(parts),
        progress=progress,
        score_first=settings["score_first"],
    )
    for batch in batches:
        pending.append(_scan_batch(batch, lens, k, settings["precision"], n_candidates))
        n_tokens += len(batch)
        if len(pending) == shard_batches:
            if store:
                store.write((batch.batch_index + 1) // shard_batches - 1, pending)
            parts.extend(pending)
            pending = []
    if pending:
        if store:
            store.write(len(parts) // shard_batches, pending)
        parts.extend(pending)
    result = _assemble(parts, k, L, dict(settings))
    seconds = time.perf_counter() - start
    timing = {"seconds": round(seconds, 2), "tokens_scanned_now": n_tokens}
    timing["tokens_per_second"] = round(n_tokens / seconds, 2) if seconds > 0 else None
    return result, timing


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


SCAN_KIND = "scan"
_SCAN_FILES = (SETTINGS_FILE, SHARDS_DIR, SATURATION_FILE, TRAJECTORIES_FILE, SUMMARY_FILE)
_SCAN_FILES += ("timing.json",)


def _legacy_scan_files(directory: Path) -> tuple[str, ...]:
    """A scan folder written before folders kept a record of their files: its files are the
    scan's own when ``settings.json`` holds a scan's settings."""
    try:
        settings = json.loads((directory / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    keys = {"model_name", "texts_sha256", "k", "n_layers"}
    return _SCAN_FILES if isinstance(settings, dict) and keys <= set(settings) else ()


class _ShardStore:
    """``out/shards/shard-00012.safetensors``: the finished batches of an interrupted run.

    Opening it checks the folder: a finished scan with these settings is ``complete`` (nothing
    to do) when resuming; a folder holding a scan refuses a new one unless resuming with the
    same settings; a folder holding anything beyond-top1 did not write is refused.
    """

    def __init__(self, folder: OutputFolder, settings: dict, resume: bool):
        self.folder = folder
        self.directory = folder.path
        self.shards = folder.path / SHARDS_DIR
        settings_path = folder.path / SETTINGS_FILE
        self.complete = False
        if settings_path.exists() and folder.owns(SETTINGS_FILE):
            try:
                previous = json.loads(settings_path.read_text())
            except json.JSONDecodeError as exc:
                raise ScanFileError(
                    f"{settings_path} is corrupt ({exc}); use a new --out"
                ) from None
            if not resume:
                raise ScanFileError(
                    f"{folder.path} already holds a scan; pass resume=True (--resume) to "
                    "continue or reuse it, or choose a new output folder"
                )
            diff = {
                key
                for key in set(previous) | set(settings)
                if previous.get(key) != settings.get(key)
            }
            if diff:
                raise ScanFileError(
                    f"cannot resume {folder.path}: it was started with other settings "
                    f"({', '.join(sorted(diff))} differ). Use the same arguments or a new folder."
                )
            self.complete = all((folder.path / name).is_file() for name in FINAL_FILES)
            if self.complete:
                return
        foreign = folder.foreign()
        if foreign:
            raise ScanFileError(
                f"{folder.path} holds files beyond-top1 did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder"
            )
        folder.claim(SHARDS_DIR)
        self.shards.mkdir(exist_ok=True)
        folder.write_json(SETTINGS_FILE, settings)

    def completed_prefix(self) -> list[dict]:
        """The batches of shards ``0, 1, ...`` up to the first missing or torn one (in order).

        Shards are written in order and each only once all its batches are done, so an
        interrupted run leaves a prefix; anything after a gap is deleted and redone.
        """
        parts: list[dict] = []
        index = 0
        while True:
            path = self.shards / f"shard-{index:05d}.safetensors"
            try:
                arrays = safetensors.numpy.load_file(str(path))
                n_parts = int(arrays.pop("n_parts")[0])
            except Exception:  # noqa: BLE001 - missing or torn: redo from here
                break
            parts.extend(
                {key.split("/", 1)[1]: v for key, v in arrays.items() if key.startswith(f"{p}/")}
                for p in range(n_parts)
            )
            index += 1
        for path in self.shards.glob("shard-*.safetensors"):
            if int(path.stem.split("-")[1]) >= index:
                path.unlink(missing_ok=True)
        return parts

    def n_shards(self) -> int:
        return len(list(self.shards.glob("shard-*.safetensors")))

    def write(self, index: int, parts: list[dict]) -> None:
        arrays = {
            f"{p}/{key}": np.ascontiguousarray(v)
            for p, part in enumerate(parts)
            for key, v in part.items()
        }
        arrays["n_parts"] = np.array([len(parts)], dtype=np.int64)
        data = safetensors.numpy.save(arrays)
        atomic_write_bytes(self.shards / f"shard-{index:05d}.safetensors", data)

    def finish(self, timing: dict) -> None:
        self.folder.write_json("timing.json", timing)
        shutil.rmtree(self.shards, ignore_errors=True)


def save_scan(
    result: ScanResult,
    directory: str | Path | OutputFolder,
    *,
    n_permutations: int = DEFAULT_PERMUTATIONS,
    filter_fraction: float = DEFAULT_FILTER_FRACTION,
    seed: int = 0,
) -> Path:
    """Write ``saturation.parquet``, ``trajectories.safetensors`` and ``summary.json``.

    ``summary.json`` holds the settings, counts and (for ``k >= 3``) the ordering statistics; no
    timings, so the same scan always writes the same bytes. A file of the same name that
    beyond-top1 did not write is never replaced.
    """
    adopt = () if isinstance(directory, OutputFolder) else _legacy_scan_files(Path(directory))
    with output_folder(directory, SCAN_KIND, adopt=adopt) as folder:
        _write_scan_files(result, folder, n_permutations, filter_fraction, seed)
    return folder.path


def _write_scan_files(result, folder: OutputFolder, n_permutations, filter_fraction, seed):
    folder.write_bytes(SATURATION_FILE, _parquet_bytes(result.saturation))
    arrays = {name: np.ascontiguousarray(getattr(result, name)) for name in TRAJECTORY_FIELDS}
    folder.write_bytes(TRAJECTORIES_FILE, safetensors.numpy.save(arrays))
    summary = {"settings": result.settings, "n_positions": len(result)}
    summary["n_texts_with_positions"] = int(result.saturation["text_id"].nunique())
    if result.k >= 3 and len(result):
        stats = result.ordering(
            n_permutations=n_permutations, filter_fraction=filter_fraction, seed=seed
        )
        summary["ordering"] = stats.summary()
        summary["rank_correspondence"] = stats.rank_correspondence.to_dict(orient="records")
    s = result.saturation_array()
    summary["mean_saturation_layer"] = [float(x) for x in s.mean(0)] if len(s) else []
    folder.write_json(SUMMARY_FILE, summary)
    if not (folder.path / SETTINGS_FILE).exists():
        folder.write_json(SETTINGS_FILE, result.settings)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def load_scan(directory: str | Path) -> ScanResult:
    """Read a folder written by :func:`scan` (``out=``) or :func:`save_scan`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScanFileError(f"no scan folder at {directory}")
    missing = [
        name
        for name in (SATURATION_FILE, TRAJECTORIES_FILE, SUMMARY_FILE)
        if not (directory / name).is_file()
    ]
    if missing:
        hint = (
            " (an interrupted run: continue it with --resume)"
            if (directory / SHARDS_DIR).is_dir()
            else ""
        )
        raise ScanFileError(f"{directory} lacks {', '.join(missing)}{hint}")
    try:
        frame = pd.read_parquet(directory / SATURATION_FILE)
        arrays = safetensors.numpy.load_file(str(directory / TRAJECTORIES_FILE))
        summary = json.loads((directory / SUMMARY_FILE).read_text())
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise ScanFileError(f"corrupt scan folder {directory}: {exc}. Re-run the scan.") from None
    if set(arrays) != set(TRAJECTORY_FIELDS) or any(len(a) != len(frame) for a in arrays.values()):
        raise ScanFileError(f"corrupt scan folder {directory}: arrays do not match the table")
    return ScanResult(saturation=frame, settings=summary.get("settings", {}), **arrays)


__all__ = [
    "ScanFileError",
    "ScanResult",
    "load_scan",
    "save_scan",
    "scan",
    "texts_fingerprint",
]
