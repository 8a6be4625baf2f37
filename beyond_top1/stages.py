"""Cached, resumable pipeline stages: one folder per stage, a done marker holding its settings.

:meth:`Stages.run` runs ``fn(folder) -> metrics`` for a named stage unless that stage already
finished with the same settings. A stage's settings are its task's typed config (a frozen
dataclass of :mod:`beyond_top1.tasks`), the identity of the model it reads and the fingerprints
of the stages it depends on:

* ``<root>/<name>/done.json`` holds the settings, their fingerprint, the stage's metrics (a small
  JSON dict), its status and its duration. It is written atomically and last, so a stage that
  was interrupted never looks finished.
* Same settings as the done marker: the stage is skipped and its recorded metrics returned.
* Other settings: the folder is emptied and the stage reruns.
* No done marker but ``started.json`` with the same settings (an interrupted run): the folder is
  kept and ``fn`` runs again on it, so a stage that checkpoints (a scan with ``resume=True``)
  continues where it stopped. With other settings the folder is emptied first.
* A stage may depend on earlier ones (``after=``): their fingerprints enter its settings, so
  rerunning an upstream stage with new settings reruns everything downstream.
* ``fn`` raising :class:`StageUnavailable` (e.g. too few positions for a probe) finishes the
  stage with status ``"unavailable"`` and the reason; any other exception propagates and leaves
  the stage unfinished (the next run retries it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from beyond_top1.fileio import atomic_write_json, to_jsonable
from beyond_top1.tasks.common import AnalysisUnavailable

DONE_FILE = "done.json"
STARTED_FILE = "started.json"


# Raised by a stage function when its analysis cannot run on this data (says why).
StageUnavailable = AnalysisUnavailable


def fingerprint(settings: Mapping) -> str:
    """SHA-256 (16 hex digits) of the canonical JSON of ``settings``."""
    text = json.dumps(to_jsonable(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _changed_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """The keys whose values differ, ``config.field`` for a config's fields."""
    old, new = to_jsonable(old), to_jsonable(new)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "config":
            out += _changed_keys(a, b, f"{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


@dataclass
class StageRecord:
    """A finished stage: where it lives, how it was made and what it measured.

    ``status`` is ``"done"`` or ``"unavailable"`` (then ``metrics["reason"]`` says why);
    ``cached`` is true when this run found it finished and skipped it.
    """

    name: str
    directory: Path
    settings: dict
    fingerprint: str
    metrics: dict = field(default_factory=dict)
    status: str = "done"
    seconds: float = 0.0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def to_json(self) -> dict:
        return {
            "status": self.status,
            "cached": self.cached,
            "seconds": round(self.seconds, 2),
            "fingerprint": self.fingerprint,
            "settings": to_jsonable(self.settings),
            "metrics": to_jsonable(self.metrics),
        }


class Stages:
    """Runs named stages under ``root`` (see the module docstring).

    Args:
        root: the folder that holds one sub-folder per stage.
        force: stage names to rerun even when finished with the same settings.
        log: a ``print``-like function for one progress line per event (``None``: silent).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        force: Iterable[str] = (),
        log: Callable[[str], None] | None = print,
    ):
        self.root = Path(root)
        self.force = set(force)
        self.log = log or (lambda _line: None)
        self.records: dict[str, StageRecord] = {}

    def run(
        self,
        name: str,
        config,
        fn: Callable[[Path], Mapping | None],
        *,
        identity: Mapping | None = None,
        after: Iterable[StageRecord] = (),
        describe: str = "",
    ) -> StageRecord:
        """Run stage ``name`` (or skip it when finished with the same ``config``, model
        ``identity`` and upstream stages)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"a stage name must be a plain folder name, got {name!r}")
        if not dataclasses.is_dataclass(config) or isinstance(config, type):
            raise TypeError(f"a stage's config must be a dataclass instance, got {config!r}")
        effective = dict(to_jsonable(dict(identity or {})))
        effective["task"] = type(config).__name__
        effective["config"] = to_jsonable(dataclasses.asdict(config))
        upstream = {rec.name: rec.fingerprint for rec in after}
        if upstream:
            effective["after"] = upstream
        key = fingerprint(effective)
        folder = self.root / name
        done = _read_json(folder / DONE_FILE)
        what = f"{name}" + (f" ({describe})" if describe else "")
        if done is not None and done.get("fingerprint") == key and name not in self.force:
            record = StageRecord(
                name,
                folder,
                effective,
                key,
                metrics=done.get("metrics", {}),
                status=done.get("status", "done"),
                seconds=float(done.get("seconds", 0.0)),
                cached=True,
            )
            self.log(f"[{name}] finished earlier with the same settings: skipped")
            self.records[name] = record
            return record
        started = _read_json(folder / STARTED_FILE)
        if done is not None:
            why = (
                "forced"
                if name in self.force and done.get("fingerprint") == key
                else "settings changed: "
                + ", ".join(_changed_keys(done.get("settings", {}), effective))
            )
            self.log(f"[{name}] rerun ({why})")
            self._clear(folder)
        elif started is not None and started.get("fingerprint") == key:
            self.log(f"[{name}] resuming an interrupted run: {what}")
        else:
            if folder.exists():
                self._clear(folder)
            self.log(f"[{name}] running: {what}")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / STARTED_FILE, {"fingerprint": key, "settings": effective})
        start = time.perf_counter()
        try:
            metrics = to_jsonable(dict(fn(folder) or {}))
            status = "done"
        except StageUnavailable as exc:
            metrics, status = {"reason": str(exc)}, "unavailable"
            self.log(f"[{name}] unavailable: {exc}")
        seconds = time.perf_counter() - start
        record = StageRecord(name, folder, effective, key, metrics, status, seconds, False)
        atomic_write_json(
            folder / DONE_FILE,
            {**record.to_json(), "name": name, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")},
        )
        (folder / STARTED_FILE).unlink(missing_ok=True)
        if status == "done":
            self.log(f"[{name}] done in {seconds:.1f} s")
        self.records[name] = record
        return record

    @staticmethod
    def _clear(folder: Path) -> None:
        """Empty ``folder`` (the done marker first, so a crash mid-way never looks finished)."""
        (folder / DONE_FILE).unlink(missing_ok=True)
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


__all__ = [
    "DONE_FILE",
    "STARTED_FILE",
    "StageRecord",
    "StageUnavailable",
    "Stages",
    "fingerprint",
]
