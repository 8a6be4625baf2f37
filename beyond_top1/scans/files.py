"""A scan's folder: its files, written in bounded memory, and read back lazily.

``saturation.parquet`` (one row per position, in row groups of 65,536 positions),
``trajectories.safetensors`` (the per-layer arrays; a saturation-only scan with several lenses
has ``lenses.safetensors`` instead), ``texts.jsonl``, ``summary.json`` and ``settings.json``
(plus ``timing.json`` from a run). An interrupted run leaves ``shards/``, which
``resume=True`` continues from.

One streaming writer makes the files both from a result in memory (:func:`save_scan`) and from
a finished run's shards (:func:`write_scan_files`, one batch in memory at a time, on one rank or
after a ``torchrun``): the same positions give the same bytes however they were batched or
sharded. :func:`load_scan` memory-maps the arrays (copy-on-write), so opening a scan of
millions of positions reads only what is used; :func:`scan_dataset` and :func:`scan_ordering`
read the table a row group at a time. A folder records the files beyond-top1 wrote (see
:mod:`beyond_top1.fileio`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors
import safetensors.numpy
import torch

from beyond_top1.fileio import OutputFolder, atomic_write_bytes, output_folder
from beyond_top1.safetensors_file import SafetensorsLayout, map_safetensors, write_safetensors
from beyond_top1.saturation import OrderingAccumulator, OrderingStats, s_columns
from beyond_top1.scans.result import ScanFileError, ScanResult, warn_ordering_arguments

ROW_GROUP_ROWS = 1 << 16  # saturation.parquet row groups: the unit a lazy reader loads

SATURATION_FILE = "saturation.parquet"
TRAJECTORIES_FILE = "trajectories.safetensors"
LENSES_FILE = "lenses.safetensors"  # saturation-only scans with several lenses
TEXTS_FILE = "texts.jsonl"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "settings.json"
TIMING_FILE = "timing.json"
SHARDS_DIR = "shards"
FINAL_FILES = (SATURATION_FILE, TRAJECTORIES_FILE, SUMMARY_FILE)
TRAJECTORY_FIELDS = ("top_ids", "final_ranks", "top_logprobs", "resid_cos")
SCAN_KIND = "scan"
_SCAN_FILES = (SETTINGS_FILE, SHARDS_DIR, SATURATION_FILE, TRAJECTORIES_FILE, SUMMARY_FILE)
_SCAN_FILES += (TIMING_FILE, TEXTS_FILE, LENSES_FILE)


def final_files(settings: dict) -> tuple[str, ...]:
    """The files a finished scan with ``settings`` has."""
    if settings.get("keep") == "saturation":
        return (SATURATION_FILE, SUMMARY_FILE)
    return FINAL_FILES


def legacy_scan_files(directory: Path) -> tuple[str, ...]:
    """A scan folder written before folders kept a record of their files: its files are the
    scan's own when ``settings.json`` holds a scan's settings."""
    try:
        settings = json.loads((directory / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    keys = {"model_name", "texts_sha256", "k", "n_layers"}
    return _SCAN_FILES if isinstance(settings, dict) and keys <= set(settings) else ()


class ShardStore:
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
            self.complete = all((folder.path / n).is_file() for n in final_files(settings))
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

    @classmethod
    def writer(cls, directory: Path) -> ShardStore:
        """Shard files only, for ranks other than 0 under ``torchrun``: rank 0 holds the
        folder's lock, checked it and claimed ``shards/`` for the whole run."""
        store = cls.__new__(cls)
        store.folder, store.directory = None, Path(directory)
        store.shards, store.complete = store.directory / SHARDS_DIR, False
        return store

    def _path(self, index: int) -> Path:
        return self.shards / f"shard-{index:05d}.safetensors"

    def is_finished(self, index: int) -> bool:
        """Whether shard ``index`` is on disk, from its header only (shards are written
        atomically, once all their batches are done)."""
        try:
            with safetensors.safe_open(str(self._path(index)), framework="numpy") as f:
                return "n_parts" in f.keys()
        except Exception:  # noqa: BLE001 - missing or torn: redo it
            return False

    def load(self, index: int) -> list[dict] | None:
        """The batches of shard ``index``, or ``None`` when it is missing or torn (redo it)."""
        try:
            arrays = safetensors.numpy.load_file(str(self._path(index)))
            n_parts = int(arrays.pop("n_parts")[0])
        except Exception:  # noqa: BLE001 - missing or torn: redo it
            return None
        return [
            {key.split("/", 1)[1]: v for key, v in arrays.items() if key.startswith(f"{p}/")}
            for p in range(n_parts)
        ]

    def write(self, index: int, parts: list[dict]) -> None:
        arrays = {
            f"{p}/{key}": np.ascontiguousarray(v)
            for p, part in enumerate(parts)
            for key, v in part.items()
        }
        arrays["n_parts"] = np.array([len(parts)], dtype=np.int64)
        data = safetensors.numpy.save(arrays)
        atomic_write_bytes(self._path(index), data)

    def finish(self, timing: dict) -> None:
        self.folder.write_json(TIMING_FILE, timing)
        shutil.rmtree(self.shards, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

ADDITIVE_INFO = ("rows_reread_in_fp32", "layer_rows_read")  # counts that add over batches


def scan_info(counts: dict, n_positions: int, settings: dict) -> dict:
    """A run's ``info`` from its summed counts: with ``layer_rows_read`` (saturation-only
    scans), also the fraction of the ``positions x layers x lenses`` rows it read."""
    info = dict(counts)
    if "layer_rows_read" in info:
        n_rows = n_positions * settings["n_layers"] * max(1, len(settings.get("lenses", [0])))
        info["layer_rows_read_fraction"] = info["layer_rows_read"] / max(n_rows, 1)
    return info


def array_fields(result: ScanResult) -> dict[str, np.ndarray]:
    """The arrays of ``result`` its safetensors file holds (per-layer read-outs, further
    lenses, probe predictions), by file key."""
    arrays = {}
    if result.keeps_trajectories:
        arrays = {name: getattr(result, name) for name in TRAJECTORY_FIELDS}
    for lens, fields in result.other_lenses.items():
        arrays.update({f"lens/{lens}/{key}": value for key, value in fields.items()})
    for name in ("probe_task", "probe_settled"):
        if getattr(result, name) is not None:
            arrays[name] = getattr(result, name)
    return arrays


class _RowGroups:
    """``saturation.parquet`` written from frames of any length, in row groups of
    ``ROW_GROUP_ROWS`` rows whatever the frames were: the same rows give the same file."""

    def __init__(self, path: Path):
        self.path, self.writer = path, None
        self.pending: list[pd.DataFrame] = []
        self.n_pending = 0
        self.template: pd.DataFrame | None = None

    def add(self, frame: pd.DataFrame) -> None:
        self.template = frame.iloc[:0]
        if len(frame):
            self.pending.append(frame)
            self.n_pending += len(frame)
        while self.n_pending >= ROW_GROUP_ROWS:
            self._write(ROW_GROUP_ROWS)

    def _write(self, rows: int) -> None:
        frame = pd.concat(self.pending) if len(self.pending) > 1 else self.pending[0]
        table = pa.Table.from_pandas(frame.iloc[:rows], preserve_index=False)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)
        rest = frame.iloc[rows:]
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.n_pending:
            self._write(self.n_pending)
        if self.writer is None:  # no positions: the columns only
            schema = pa.Table.from_pandas(self.template, preserve_index=False).schema
            self.writer = pq.ParquetWriter(self.path, schema)
        self.writer.close()


class _Totals:
    """What ``summary.json`` says of all pieces: positions, texts, mean ``s``, counts."""

    def __init__(self):
        self.n, self.texts = 0, set()
        self.s_sum: np.ndarray | None = None
        self.counts: dict[str, int] = {}
        self.arrays = SafetensorsLayout()
        self.keeps_trajectories = True

    def add(self, piece: ScanResult) -> None:
        s = piece.saturation_array().astype(np.int64)
        self.s_sum = s.sum(0) if self.s_sum is None else self.s_sum + s.sum(0)
        self.n += len(piece)
        self.texts.update(np.unique(piece.saturation["text_id"].to_numpy()).tolist())
        for key in ADDITIVE_INFO:
            if key in piece.info:
                self.counts[key] = self.counts.get(key, 0) + int(piece.info[key])
        self.arrays.add(array_fields(piece))
        self.keeps_trajectories = piece.keeps_trajectories

    def mean_saturation_layer(self) -> list[float]:
        return [float(x) for x in self.s_sum / self.n] if self.n else []


def write_scan_files(
    folder: OutputFolder,
    pieces: Callable[[], Iterator[ScanResult]],
    settings: dict,
    texts: list[str] | None,
    info: dict | None = None,
) -> None:
    """Write a scan's final files into ``folder`` (held by the caller) from ``pieces()``:
    consecutive positions, each a :class:`ScanResult` (a batch, or a whole result). Called
    twice, ``pieces`` must give the same pieces; only one is in memory at a time.
    ``info``: the run's info, or ``None`` to sum the pieces' counts (:func:`scan_info`)."""
    totals = _Totals()

    def table(tmp: Path) -> None:
        rows = _RowGroups(tmp)
        for piece in pieces():
            rows.add(piece.saturation)
            totals.add(piece)
        rows.close()

    folder.write(SATURATION_FILE, table)
    totals.arrays.check_rows(totals.n)
    name = TRAJECTORIES_FILE if totals.keeps_trajectories else LENSES_FILE
    if totals.keeps_trajectories or totals.arrays.specs:
        arrays = (array_fields(piece) for piece in pieces())
        folder.write(name, lambda tmp: write_safetensors(tmp, totals.arrays, arrays))
    if texts is not None:

        def lines(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                for text in texts:
                    handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

        folder.write(TEXTS_FILE, lines)
    info = scan_info(totals.counts, totals.n, settings) if info is None else info
    summary = {"settings": settings, "n_positions": totals.n, **info}
    summary["n_texts_with_positions"] = len(totals.texts)
    summary["mean_saturation_layer"] = totals.mean_saturation_layer()
    folder.write_json(SUMMARY_FILE, summary)
    if not (folder.path / SETTINGS_FILE).exists():
        folder.write_json(SETTINGS_FILE, settings)


def save_scan(result: ScanResult, directory: str | Path | OutputFolder, **ordering) -> Path:
    """Write the scan's files (see the module docstring) atomically; a file of the same name
    that beyond-top1 did not write is never replaced. ``summary.json`` holds the settings and
    counts, no timings, so the same scan always writes the same bytes. (``ordering``: the old
    ``n_permutations``/``filter_fraction``/``seed``, now ignored with a warning.)"""
    warn_ordering_arguments("save_scan", ordering)
    adopt = () if isinstance(directory, OutputFolder) else legacy_scan_files(Path(directory))
    with output_folder(directory, SCAN_KIND, adopt=adopt) as folder:
        write_scan_files(folder, lambda: iter([result]), result.settings, result.texts, result.info)
    return folder.path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def scan_dataset(directory: str | Path):
    """``saturation.parquet`` of a scan folder as a ``pyarrow.dataset.Dataset``: filter,
    project and iterate it (``.to_batches(columns=[...])``) without loading the table. Scans
    written since row groups were introduced hold 65,536 positions per row group (older ones
    one row group of up to ~1M positions, which a lazy read loads at once)."""
    import pyarrow.dataset as ds

    path = Path(directory) / SATURATION_FILE
    if not path.is_file():
        raise ScanFileError(f"no {SATURATION_FILE} in {directory}: is it a finished scan folder?")
    return ds.dataset(path, format="parquet")


def scan_ordering(directory: str | Path, **kwargs) -> OrderingStats:
    """001's ordering statistics of a scan folder, read one row group at a time: memory does
    not grow with the number of positions (:class:`~beyond_top1.saturation.OrderingAccumulator`;
    the same numbers as ``load_scan(directory).ordering(**kwargs)``)."""
    dataset = scan_dataset(directory)
    columns = s_columns(dataset.schema.names)
    try:
        summary = json.loads((Path(directory) / SUMMARY_FILE).read_text(encoding="utf-8"))
        n_layers = int(summary["settings"]["n_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ScanFileError(
            f"{directory} has no readable {SUMMARY_FILE} with the model's n_layers: is it a "
            "finished scan folder?"
        ) from None
    accumulator = OrderingAccumulator(len(columns), n_layers, **kwargs)
    for batch in dataset.to_batches(columns=columns, batch_size=ROW_GROUP_ROWS):
        values = np.stack([batch.column(c).to_numpy() for c in columns], axis=1)
        accumulator.update(torch.as_tensor(values))
    return accumulator.result()


def load_scan(directory: str | Path) -> ScanResult:
    """Read a folder written by :func:`~beyond_top1.scans.scan` (``out=``) or
    :func:`save_scan`. The table is read whole (~``8 (4 + 2k)`` bytes a position); the
    per-layer arrays are memory-mapped, copy-on-write (:func:`map_safetensors`), so they cost
    memory only as they are used."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScanFileError(f"no scan folder at {directory}")
    try:
        settings = json.loads((directory / SUMMARY_FILE).read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        settings = {}
    keeps = settings.get("keep") != "saturation"
    missing = [name for name in final_files(settings) if not (directory / name).is_file()]
    if missing:
        hint = (
            " (an interrupted run: continue it with --resume)"
            if (directory / SHARDS_DIR).is_dir()
            else ""
        )
        raise ScanFileError(f"{directory} lacks {', '.join(missing)}{hint}")
    try:
        frame = pd.read_parquet(directory / SATURATION_FILE)
        arrays_file = directory / (TRAJECTORIES_FILE if keeps else LENSES_FILE)
        arrays = map_safetensors(arrays_file) if arrays_file.is_file() else {}
        summary = json.loads((directory / SUMMARY_FILE).read_text())
        texts = None
        if (directory / TEXTS_FILE).is_file():
            lines = (directory / TEXTS_FILE).read_text(encoding="utf-8").splitlines()
            texts = [json.loads(line)["text"] for line in lines]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ScanFileError(f"corrupt scan folder {directory}: {exc}. Re-run the scan.") from None
    if (keeps and not set(TRAJECTORY_FIELDS) <= set(arrays)) or any(
        len(a) != len(frame) for a in arrays.values()
    ):
        raise ScanFileError(f"corrupt scan folder {directory}: arrays do not match the table")
    other: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if key.startswith("lens/"):
            _, lens, name = key.split("/", 2)
            other.setdefault(lens, {})[name] = value
    info = {k: v for k, v in summary.items() if k not in _SUMMARY_KEYS}
    return ScanResult(
        saturation=frame,
        settings=summary.get("settings", {}),
        other_lenses=other,
        probe_task=arrays.get("probe_task"),
        probe_settled=arrays.get("probe_settled"),
        texts=texts,
        info=info,
        **{name: arrays.get(name) for name in TRAJECTORY_FIELDS},
    )


_SUMMARY_KEYS = {
    "settings",
    "n_positions",
    "n_texts_with_positions",
    "mean_saturation_layer",
    "ordering",  # older scans stored their statistics
    "rank_correspondence",
}


__all__ = [
    "FINAL_FILES",
    "LENSES_FILE",
    "ROW_GROUP_ROWS",
    "SATURATION_FILE",
    "SCAN_KIND",
    "SETTINGS_FILE",
    "SHARDS_DIR",
    "SUMMARY_FILE",
    "ShardStore",
    "TEXTS_FILE",
    "TIMING_FILE",
    "TRAJECTORIES_FILE",
    "TRAJECTORY_FIELDS",
    "array_fields",
    "final_files",
    "legacy_scan_files",
    "load_scan",
    "save_scan",
    "scan_dataset",
    "scan_info",
    "scan_ordering",
    "write_scan_files",
]
