"""Writing the toolkit's files without losing anyone's data.

* Every artifact is written atomically (a temporary file in the same folder, then ``os.replace``)
  with the usual permissions (``0666 & ~umask``), by :func:`atomic_write` and its helpers.
* An output folder is checked before any computation (:func:`check_output_dir`): not a file,
  creatable, writable. Problems raise :class:`OutputError` naming the path and what to do.
* One writer per output folder: :func:`folder_lock` holds an exclusive lock on
  ``<folder>/.beyond-top1.lock`` (which records the holder's PID); a second writer is refused at
  once, never left to race.
* :class:`OutputFolder` writes only files it can prove it wrote: the names it records in
  ``<folder>/.beyond-top1.json``. An existing file of another origin is never replaced.
* :func:`to_jsonable` turns results (numpy, torch, pandas scalars, paths, NaN) into JSON.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

LOCK_FILE = ".beyond-top1.lock"


class OutputError(ValueError):
    """An output path that cannot or may not be written (the message says which and why)."""


class FolderBusyError(OutputError):
    """Another process holds the lock on an output folder."""


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def to_jsonable(value):
    """``value`` with numpy/torch scalars made Python numbers, NaN and infinities ``None``,
    tuples and sets lists (sets sorted), paths strings and dict keys strings, recursively;
    anything else unknown becomes its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy / torch scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def json_text(obj) -> str:
    """The canonical JSON text of ``obj`` (sorted keys, one-space indent, final newline)."""
    return json.dumps(to_jsonable(obj), indent=1, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file next to it, which then
    replaces ``path`` in one rename. Parents are created; on any error ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) create files as 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json_text(obj))


def atomic_write_csv(path: str | Path, frame, **kwargs) -> Path:
    """A DataFrame as CSV (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    return atomic_write_text(path, frame.to_csv(**kwargs))


def write_signed_file(path: str | Path, write: Callable[[Path], None], signature: bytes) -> Path:
    """:func:`atomic_write` of a single-file artifact that carries ``signature`` in its first
    64 KiB (a format tag in its header, a generator tag in a page): an existing file at
    ``path`` is replaced only if it carries the signature too, i.e. this tool wrote it."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    if path.exists():
        with open(path, "rb") as handle:
            ours = signature in handle.read(1 << 16)
        if not ours:
            raise OutputError(
                f"refusing to replace {path}: beyond-top1 did not write it. Move it away or "
                "choose another file name"
            )
    check_output_dir(path.parent)
    return atomic_write(path, write)


def write_new_file(path: str | Path, write: Callable[[Path], None]) -> Path:
    """:func:`atomic_write` of a file that must not exist yet (a CSV export the user named)."""
    path = Path(path)
    if path.exists():
        raise OutputError(f"{path} exists; remove it or choose another file name")
    check_output_dir(path.parent)
    return atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------


def check_output_dir(path: str | Path, *, what: str = "output folder") -> Path:
    """Check, before any computation, that ``path`` can be a folder this process writes to.

    Raises :class:`OutputError` when it is a file, or when neither it nor its nearest existing
    parent is a writable folder. Creates nothing.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"the {what} {path} is a file; give a folder path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create the {what} {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write the {what} {path}: {probe} is not writable; choose another folder"
        )
    return path


@contextlib.contextmanager
def folder_lock(path: str | Path) -> Iterator[Path]:
    """Hold the writer's lock on folder ``path`` (created if needed) for the block.

    A second holder, in this or another process, gets :class:`FolderBusyError` with the first
    one's PID at once. The lock file is removed when the block ends; a process that dies
    releases the lock with it (the stale file is reused).
    """
    path = check_output_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusyError(
                f"{path} is being written by another process (PID {holder}); wait for it to "
                "finish or choose another folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed this file as we opened it: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


MANIFEST_FILE = ".beyond-top1.json"


class OutputFolder:
    """A folder of tool-written files, locked while it is written.

    ``kind`` names what the folder holds (``"lens"``, ``"scan"``, ``"eval-lens"``, ...). Each
    file written through :meth:`write` is recorded in ``.beyond-top1.json``; a file that exists
    but is not recorded there is someone else's and is never replaced (:class:`OutputError`).
    ``adopt`` names files of an older, recognised layout that may be replaced although the
    folder has no record yet (e.g. a lens folder saved before records existed).

    Use as a context manager: ``with OutputFolder(out, "scan") as folder: folder.write_json(...)``.
    """

    def __init__(self, path: str | Path, kind: str, *, adopt: tuple[str, ...] = ()):
        self.path = check_output_dir(path)
        self.kind = kind
        self.adopt = set(adopt)
        self._lock = None
        self.recorded: set[str] = set()
        self.files: set[str] = set()
        self._load_record()  # checked now (before any work) and again under the lock

    def __enter__(self) -> OutputFolder:
        self._lock = folder_lock(self.path)
        self._lock.__enter__()
        try:
            self._load_record()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def _load_record(self) -> None:
        record = self._read_record()
        if record is not None and record.get("kind") != self.kind:
            raise OutputError(
                f"{self.path} holds a beyond-top1 {record.get('kind')!r} output, not a "
                f"{self.kind!r} one; choose another folder"
            )
        self.recorded = set((record or {}).get("files", []))
        self.files = self.recorded | self.adopt

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def _read_record(self) -> dict | None:
        try:
            record = json.loads((self.path / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def owns(self, name: str) -> bool:
        """Whether ``name`` is absent or was written by this tool into this folder."""
        return name in self.files or not (self.path / name).exists()

    def foreign(self) -> list[str]:
        """Entries of the folder this tool did not write (its own bookkeeping aside)."""
        mine = {name.split("/")[0] for name in self.files} | {LOCK_FILE, MANIFEST_FILE}
        return sorted(p.name for p in self.path.iterdir() if p.name not in mine)

    def claim(self, name: str) -> Path:
        """Record ``name`` as this tool's (refusing a file of another origin) and return its
        path; for files written by other means (a folder of shards, say)."""
        target = self.path / name
        if not self.owns(name):
            raise OutputError(
                f"refusing to replace {target}: beyond-top1 did not write it. Move it away or "
                "choose another output folder"
            )
        if name not in self.recorded:  # adopted files are recorded once written, too
            self.recorded.add(name)
            self.files.add(name)
            record = {"kind": self.kind, "files": sorted(self.recorded)}
            atomic_write_json(self.path / MANIFEST_FILE, record)
        return target

    def write(self, name: str, write: Callable[[Path], None]) -> Path:
        """:func:`atomic_write` of ``name`` inside the folder, if this tool may replace it."""
        return atomic_write(self.claim(name), write)

    def write_bytes(self, name: str, data: bytes) -> Path:
        return self.write(name, lambda tmp: tmp.write_bytes(data))

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, json_text(obj))

    def write_csv(self, name: str, frame, **kwargs) -> Path:
        kwargs.setdefault("index", False)
        return self.write_text(name, frame.to_csv(**kwargs))


@contextlib.contextmanager
def output_folder(target: str | Path | OutputFolder, kind: str, **kwargs) -> Iterator[OutputFolder]:
    """``target`` as an entered :class:`OutputFolder`: one the caller already holds is used as
    it is (its lock held by the caller); a path is opened, locked and released here."""
    if isinstance(target, OutputFolder):
        yield target
        return
    with OutputFolder(target, kind, **kwargs) as folder:
        yield folder


__all__ = [
    "FolderBusyError",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "OutputFolder",
    "OutputError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "folder_lock",
    "output_folder",
    "json_text",
    "to_jsonable",
    "write_new_file",
    "write_signed_file",
]
