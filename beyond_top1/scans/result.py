"""What a scan keeps, and its folder: compact per-position results of one or several lenses
(optionally a probe's predictions), written as ``saturation.parquet``,
``trajectories.safetensors``, ``texts.jsonl``, ``summary.json`` and ``settings.json``.

A saturation-only scan (``keep="saturation"``) keeps no per-layer arrays: the same files without
``trajectories.safetensors`` (further lenses' final top-k and ``s`` go to ``lenses.safetensors``).

A folder records the files beyond-top1 wrote (see :mod:`beyond_top1.fileio`); an interrupted
run leaves ``shards/``, which ``resume=True`` continues from. Statistics are computed on
request (:meth:`ScanResult.ordering`), never when saving.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
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

from beyond_top1.fileio import OutputFolder, atomic_write_bytes, output_folder
from beyond_top1.saturation import (
    OrderingAccumulator,
    OrderingStats,
    ordering,
    s_columns,
    saturation_layers,
)

LENS_FIELDS = ("top_ids", "final_ranks", "top_logprobs")


class ScanFileError(ValueError):
    """A scan folder is missing, corrupt, or was written with other settings."""


@dataclass
class ScanResult:
    """Compact per-position results of :func:`~beyond_top1.scans.scan`; ``n`` = scored positions.

    Attributes:
        saturation: one row per position: ``text_id, pos, token_id, next_token_id`` (``-1`` at
            a text's last token), ``top_1_id..top_k_id`` (the final top-k), ``s_1..s_k``, all
            under the scan's (first) lens.
        top_ids: ``[n, L, k]`` that lens' top-k ids at every layer (rank order); this and the
            next three are ``None`` in a saturation-only scan (``keep="saturation"``).
        final_ranks: ``[n, L, k]`` rank (1-based) of final token ``i`` at every layer.
        top_logprobs: ``[n, L, k]`` log-probs of ``top_ids`` under the lens.
        resid_cos: ``[n, L]`` ``cos(h_l, h_{l-1})`` (``h_{-1}`` = the embedding).
        settings: how the scan was made (model, lenses, k, precision, texts...).
        other_lenses: per further lens name, its ``top_ids``, ``final_ranks``, ``top_logprobs``
            (saturation-only: its ``final_ids`` and ``s``, ``[n, k]``).
        probe_task, probe_settled: ``[n, L]`` a task probe's prediction (and its probability of
            task ``>= 2``) at every layer, when the scan was given a probe.
        texts: the texts scanned (``None`` for scans saved before scans kept them).
        info: what the run found beyond the settings (e.g. rows read again in fp32).
    """

    saturation: pd.DataFrame
    top_ids: Int[np.ndarray, "n layer k"] | None
    final_ranks: Int[np.ndarray, "n layer k"] | None
    top_logprobs: Float[np.ndarray, "n layer k"] | None
    resid_cos: Float[np.ndarray, "n layer"] | None
    settings: dict = field(default_factory=dict)
    other_lenses: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    probe_task: Int[np.ndarray, "n layer"] | None = field(default=None, repr=False)
    probe_settled: Float[np.ndarray, "n layer"] | None = field(default=None, repr=False)
    texts: list[str] | None = field(default=None, repr=False)
    info: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        if self.top_ids is None:
            return int(self.settings["n_layers"])
        return int(self.top_ids.shape[1])

    @property
    def k(self) -> int:
        if self.top_ids is None:
            return int(self.settings["k"])
        return int(self.top_ids.shape[2])

    @property
    def keeps_trajectories(self) -> bool:
        """Whether the per-layer arrays were kept (not a ``keep="saturation"`` scan)."""
        return self.top_ids is not None

    def require_trajectories(self, what: str) -> None:
        """Raise a clear error when ``what`` needs per-layer arrays this scan did not keep."""
        if not self.keeps_trajectories:
            raise ValueError(
                f"{what} needs the per-layer read-outs, and this scan kept only the saturation "
                "layers (keep='saturation'); scan again with keep='all' (the default)"
            )

    @property
    def lens_names(self) -> tuple[str, ...]:
        """The lenses read, the first one being the one of ``saturation`` and ``top_ids``."""
        if "lenses" in self.settings:  # several lenses, by the names they were given
            return tuple(self.settings["lenses"])
        return (str(self.settings.get("lens", "lens")), *self.other_lenses)

    def lens_arrays(self, name: str | None = None) -> dict[str, np.ndarray]:
        """``top_ids``, ``final_ranks``, ``top_logprobs`` of lens ``name`` (default: the first)."""
        self.require_trajectories("lens_arrays")
        if name is None or name == self.lens_names[0]:
            return {key: getattr(self, key) for key in LENS_FIELDS}
        if name not in self.other_lenses:
            raise KeyError(f"this scan read the lenses {list(self.lens_names)}, not {name!r}")
        return self.other_lenses[name]

    def __len__(self) -> int:
        return len(self.saturation)

    def saturation_array(self, lens: str | None = None) -> Int[np.ndarray, "n k"]:
        """``s_1..s_k`` as an ``[n, k]`` integer array (of another lens: ``lens=name``)."""
        if lens is None or lens == self.lens_names[0]:
            return self.saturation[[f"s_{i}" for i in range(1, self.k + 1)]].to_numpy()
        if not self.keeps_trajectories:
            if lens not in self.other_lenses:
                raise KeyError(f"this scan read the lenses {list(self.lens_names)}, not {lens!r}")
            return self.other_lenses[lens]["s"].astype(np.int64)
        top_ids = torch.as_tensor(self.lens_arrays(lens)["top_ids"])
        return saturation_layers(top_ids).numpy()

    def ordering(self, **kwargs) -> OrderingStats:
        """001's ordering statistics (see :func:`beyond_top1.saturation.ordering`), computed
        now: a scan does not store them."""
        return ordering(torch.tensor(self.saturation_array()), self.n_layers, **kwargs)

    def subset(self, rows: np.ndarray) -> ScanResult:
        """The positions selected by a boolean mask or index array."""
        rows = np.asarray(rows)

        def pick(array):
            return None if array is None else array[rows]

        return ScanResult(
            self.saturation.iloc[rows].reset_index(drop=True),
            pick(self.top_ids),
            pick(self.final_ranks),
            pick(self.top_logprobs),
            pick(self.resid_cos),
            dict(self.settings),
            {n: {k: v[rows] for k, v in a.items()} for n, a in self.other_lenses.items()},
            pick(self.probe_task),
            pick(self.probe_settled),
            self.texts,
            dict(self.info),
        )

    def save(self, directory: str | Path) -> Path:
        """Write the scan's files to ``directory`` (see :func:`save_scan`)."""
        return save_scan(self, directory)

    def __repr__(self) -> str:
        s = self.settings
        lenses = ", ".join(repr(n) for n in self.lens_names)
        return (
            f"ScanResult({len(self)} positions, {s.get('n_texts', '?')} texts, "
            f"model={s.get('model_name')!r}, lens={lenses}, k={self.k}, L={self.n_layers})"
        )

    def _repr_html_(self) -> str:
        head = self.saturation.head(10).to_html(index=False)
        return f"<div><b>{self!r}</b>{head}</div>"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

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


def warn_ordering_arguments(function: str, arguments: dict) -> None:
    """Deprecated ordering arguments: a scan no longer stores its ordering statistics."""
    unknown = set(arguments) - {"n_permutations", "filter_fraction", "seed"}
    if unknown:
        raise TypeError(f"{function}() got unexpected arguments {sorted(unknown)}")
    if arguments:
        warnings.warn(
            f"{function}({', '.join(sorted(arguments))}=...) is ignored: a scan no longer "
            "stores ordering statistics; compute them with scan.ordering(...) (or "
            "`beyond-top1 order`). The arguments go away in the next release",
            DeprecationWarning,
            stacklevel=3,
        )


def save_scan(result: ScanResult, directory: str | Path | OutputFolder, **ordering) -> Path:
    """Write the scan's files (see the module docstring) atomically; a file of the same name
    that beyond-top1 did not write is never replaced. ``summary.json`` holds the settings and
    counts, no timings, so the same scan always writes the same bytes. (``ordering``: the old
    ``n_permutations``/``filter_fraction``/``seed``, now ignored with a warning.)"""
    warn_ordering_arguments("save_scan", ordering)
    adopt = () if isinstance(directory, OutputFolder) else legacy_scan_files(Path(directory))
    with output_folder(directory, SCAN_KIND, adopt=adopt) as folder:
        folder.write_bytes(SATURATION_FILE, _parquet_bytes(result.saturation))
        arrays = {}
        if result.keeps_trajectories:
            arrays = {n: np.ascontiguousarray(getattr(result, n)) for n in TRAJECTORY_FIELDS}
        for lens, fields in result.other_lenses.items():
            arrays.update({f"lens/{lens}/{k}": np.ascontiguousarray(v) for k, v in fields.items()})
        for name in ("probe_task", "probe_settled"):
            if getattr(result, name) is not None:
                arrays[name] = np.ascontiguousarray(getattr(result, name))
        if result.keeps_trajectories:
            folder.write_bytes(TRAJECTORIES_FILE, safetensors.numpy.save(arrays))
        elif arrays:
            folder.write_bytes(LENSES_FILE, safetensors.numpy.save(arrays))
        if result.texts is not None:
            lines = "".join(
                json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in result.texts
            )
            folder.write_text(TEXTS_FILE, lines)
        summary = {"settings": result.settings, "n_positions": len(result), **result.info}
        summary["n_texts_with_positions"] = int(result.saturation["text_id"].nunique())
        s = result.saturation_array()
        summary["mean_saturation_layer"] = [float(x) for x in s.mean(0)] if len(s) else []
        folder.write_json(SUMMARY_FILE, summary)
        if not (folder.path / SETTINGS_FILE).exists():
            folder.write_json(SETTINGS_FILE, result.settings)
    return folder.path


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS)
    return sink.getvalue()


ROW_GROUP_ROWS = 1 << 16  # saturation.parquet row groups: the unit a lazy reader loads


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
    :func:`save_scan`."""
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
        arrays = safetensors.numpy.load_file(str(arrays_file)) if arrays_file.is_file() else {}
        summary = json.loads((directory / SUMMARY_FILE).read_text())
        texts = None
        if (directory / TEXTS_FILE).is_file():
            lines = (directory / TEXTS_FILE).read_text(encoding="utf-8").splitlines()
            texts = [json.loads(line)["text"] for line in lines]
    except (OSError, ValueError, KeyError, safetensors.SafetensorError) as exc:
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
    "LENS_FIELDS",
    "SATURATION_FILE",
    "SCAN_KIND",
    "SETTINGS_FILE",
    "SHARDS_DIR",
    "SUMMARY_FILE",
    "ScanFileError",
    "ScanResult",
    "ShardStore",
    "TEXTS_FILE",
    "TIMING_FILE",
    "TRAJECTORIES_FILE",
    "TRAJECTORY_FIELDS",
    "final_files",
    "legacy_scan_files",
    "load_scan",
    "scan_dataset",
    "scan_ordering",
    "save_scan",
]
