"""Lens artefacts: a folder with ``config.json`` and ``weights.safetensors``.

:func:`save_lens` with ``format="tuned-lens"`` writes, and :func:`load_lens` also reads, the folders
of EleutherAI's ``tuned-lens`` package (``config.json`` and ``params.pt``); see
:mod:`beyond_top1.lenses.tuned_lens_format`.

``config.json`` records the lens kind, the model it was fitted for (name, dimensions and
:func:`~beyond_top1.hooked.unembedding_fingerprint`), the package version, the lens' own settings
(``Lens.config()``, including how it was fitted) and the SHA-256 of the weights file. Loading
checks all of it and raises :class:`LensFileError` with what is wrong and what to do.

Lens classes register their ``kind`` with :func:`register_lens_kind` so :func:`load_lens` can
rebuild them: ``cls.from_config(model, config["settings"])`` then ``load_state_dict``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from beyond_top1 import __version__, hooked
from beyond_top1.fileio import OutputFolder, to_jsonable

if TYPE_CHECKING:  # lens classes import this module to save themselves
    from beyond_top1.lenses.base import Lens

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "kind",
    "model_name",
    "d_model",
    "n_layers",
    "d_vocab",
    "unembedding_fingerprint",
    "weights_sha256",
    "settings",
)
MODEL_KEYS = ("n_layers", "d_model", "d_vocab", "unembedding_fingerprint")

LENS_KINDS: dict[str, type[Lens]] = {}


class LensFileError(ValueError):
    """A lens folder is missing, corrupt, of an unknown kind or saved for another model."""


def register_lens_kind(cls: type[Lens]) -> type[Lens]:
    """Class decorator: make ``cls.kind`` loadable by :func:`load_lens`."""
    LENS_KINDS[cls.kind] = cls
    return cls


def _model_identity(model) -> dict:
    return {
        "model_name": hooked.model_name(model),
        "n_layers": hooked.n_layers(model),
        "d_model": hooked.d_model(model),
        "d_vocab": hooked.d_vocab(model),
        "unembedding_fingerprint": hooked.unembedding_fingerprint(model),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


LENS_KIND = "lens"
HISTORY_FILE = "training_history.csv"
_LENS_FILES = (CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE)
TUNED_LENS_PARAMS_FILE = "params.pt"  # the tuned-lens format's (tuned_lens_format)
TUNED_LENS_SIDECAR_FILE = "beyond_top1_lens.json"
_ALL_LENS_FILES = (*_LENS_FILES, TUNED_LENS_PARAMS_FILE, TUNED_LENS_SIDECAR_FILE)
FORMATS = ("beyond-top1", "tuned-lens")


def _legacy_lens_files(directory: Path) -> tuple[str, ...]:
    """A lens folder saved before folders kept a record of their files: ``config.json`` with
    this format's keys makes its lens files ours to replace."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    ours = isinstance(config, dict) and "format_version" in config
    return _LENS_FILES if ours and all(key in config for key in REQUIRED_KEYS) else ()


def lens_folder(directory: str | Path) -> OutputFolder:
    """The :class:`~beyond_top1.fileio.OutputFolder` a lens is saved into (enter it to write).

    Opening it checks, before any work, that the folder is new, empty or a lens this toolkit
    saved: a ``config.json`` of another origin (a Hugging Face model folder, a project) is never
    replaced, and a lens folder's other files are never touched.
    """
    folder = OutputFolder(directory, LENS_KIND, adopt=_legacy_lens_files(Path(directory)))
    check_lens_destination(folder)
    return folder


def check_lens_destination(directory: str | Path | OutputFolder) -> None:
    """Raise :class:`LensFileError` unless a lens may be written to ``directory``."""
    folder = directory
    if not isinstance(folder, OutputFolder):
        folder = OutputFolder(directory, LENS_KIND, adopt=_legacy_lens_files(Path(directory)))
    taken = [name for name in _ALL_LENS_FILES if name != HISTORY_FILE and not folder.owns(name)]
    foreign = folder.foreign() if folder.path.is_dir() else []
    if taken or (foreign and not folder.files):
        shown = ", ".join((taken or foreign)[:3]) + (", ..." if len(taken or foreign) > 3 else "")
        raise LensFileError(
            f"{folder.path} is not a lens folder saved by beyond-top1 (it holds {shown}); "
            "refusing to write into it. Choose a new or empty folder."
        )


def remove_stale(folder: OutputFolder, keep: tuple[str, ...]) -> None:
    """Delete the lens files other than ``keep`` that this toolkit wrote into ``folder`` (a
    previous lens' history, the other format's files)."""
    for name in _ALL_LENS_FILES:
        if name not in keep and (folder.path / name).exists() and folder.owns(name):
            (folder.path / name).unlink()


def save_lens(lens: Lens, directory: str | Path, *, format: str = "beyond-top1") -> Path:
    """Write ``lens`` to ``directory``: ``weights.safetensors``, then ``config.json`` (which
    holds the weights' checksum), each atomically, and a tuned lens' ``training_history.csv``.

    ``format="tuned-lens"`` writes the tuned-lens package's folder instead (``params.pt`` and
    ``config.json``, plus ``beyond_top1_lens.json``), for a tuned lens or any affine lens:
    :func:`beyond_top1.lenses.tuned_lens_format.save_tuned_lens`.

    Only a folder holding nothing, or a lens this toolkit saved, is written to; the lens files of
    another origin are refused (:class:`LensFileError`) and other files are left alone.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "tuned-lens":
        from beyond_top1.lenses.tuned_lens_format import save_tuned_lens

        return save_tuned_lens(lens, directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lens.state_dict().items()}
    with lens_folder(directory) as folder:
        weights = folder.write(WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
        config = {
            "format_version": FORMAT_VERSION,
            "kind": lens.kind,
            **_model_identity(lens.model),
            "layers": list(lens.layers),
            "beyond_top1_version": __version__,
            "settings": lens.config(),
            "weights_sha256": _sha256(weights),
        }
        folder.write_text(CONFIG_FILE, json.dumps(to_jsonable(config), indent=2) + "\n")
        history = getattr(lens, "training_history", None)  # a tuned lens' training curve
        if history is not None:
            folder.write_csv(HISTORY_FILE, history)
        remove_stale(folder, keep=_LENS_FILES if history is not None else _LENS_FILES[:2])
    return folder.path


def _corrupt(directory: Path, problem: str) -> LensFileError:
    return LensFileError(
        f"corrupt or truncated lens folder {directory}: {problem}. "
        "Re-run `beyond-top1 fit-lens` (or fit the lens and call lens.save) to write it again."
    )


def read_lens_config(directory: str | Path) -> dict:
    """The validated ``config.json`` of a lens folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LensFileError(
            f"no lens folder at {directory}: check the path, or create one with "
            f"`beyond-top1 fit-lens --kind linear --out {directory}` or lens.save(...)"
        )
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise _corrupt(directory, f"{CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(directory, f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _corrupt(directory, f"{CONFIG_FILE} does not hold a JSON object")
    if "kind" not in config and "format_version" not in config:
        raise LensFileError(
            f"{directory} is not a lens folder: its {CONFIG_FILE} is neither a beyond-top1 lens "
            "config (format_version, kind, ...) nor a tuned-lens one (d_model, "
            "num_hidden_layers, ...). Check the path."
        )
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise _corrupt(directory, f"{CONFIG_FILE} lacks the keys {missing}")
    return config


def _check_model(directory: Path, config: dict, model) -> None:
    given = _model_identity(model)
    if all(config[key] == given[key] for key in MODEL_KEYS):
        return

    def describe(identity: dict) -> str:
        return (
            f"{identity['model_name']!r} (n_layers={identity['n_layers']}, "
            f"d_model={identity['d_model']}, d_vocab={identity['d_vocab']}, "
            f"unembedding {str(identity['unembedding_fingerprint'])[:12]})"
        )

    raise LensFileError(
        f"the lens at {directory} was saved for model {describe(config)}, but the given model is "
        f"{describe(given)}. Load it with the model it was fitted on, or fit a new lens for this "
        "model."
    )


def _read_weights(directory: Path, config: dict) -> dict:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise _corrupt(directory, f"{path.name} is missing")
    if _sha256(path) != config["weights_sha256"]:
        raise _corrupt(
            directory, f"{path.name} does not match the checksum in {CONFIG_FILE} (truncated?)"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise _corrupt(directory, f"{path.name} cannot be read ({exc})") from None


def load_lens(directory: str | Path, model) -> Lens:
    """Load a lens saved by :func:`save_lens` for ``model`` (checked against the saved model).

    A tuned-lens package folder (``config.json`` with tuned-lens' keys, and ``params.pt``) is
    read as a :class:`~beyond_top1.lenses.tuned.TunedLens`:
    :func:`beyond_top1.lenses.tuned_lens_format.load_tuned_lens`.

    Raises:
        LensFileError: the folder is missing or corrupt, the kind is unknown, or the lens was
            saved for another model.
    """
    directory = Path(directory)
    from beyond_top1.lenses.tuned_lens_format import is_tuned_lens_folder, load_tuned_lens

    if is_tuned_lens_folder(directory):
        return load_tuned_lens(directory, model)
    config = read_lens_config(directory)
    kind = config["kind"]
    if kind not in LENS_KINDS:
        raise LensFileError(
            f"unknown lens kind {kind!r} in {directory}; known kinds: {sorted(LENS_KINDS)}. "
            "Import the module that defines it (it registers itself with register_lens_kind)."
        )
    _check_model(directory, config, model)
    state = _read_weights(directory, config)
    lens = LENS_KINDS[kind].from_config(model, config["settings"])
    try:
        lens.load_state_dict(state)
    except RuntimeError as exc:
        raise _corrupt(directory, f"the weights do not fit a {kind!r} lens ({exc})") from None
    return lens.eval()


__all__ = [
    "FORMATS",
    "LENS_KINDS",
    "LensFileError",
    "check_lens_destination",
    "lens_folder",
    "load_lens",
    "read_lens_config",
    "register_lens_kind",
    "remove_stale",
    "save_lens",
]
