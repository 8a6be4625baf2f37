"""Tuned lenses in the file format of EleutherAI's ``tuned-lens`` package (0.2.0), both ways.

**The format** (``tuned_lens.nn.TunedLens.save``): a folder with

* ``config.json``: ``TunedLensConfig`` as a JSON object: ``base_model_name_or_path``,
  ``d_model``, ``num_hidden_layers``, ``bias`` (true), ``base_model_revision`` (null),
  ``unembed_hash`` and ``lens_type`` (``"linear_tuned_lens"``); tuned-lens warns about and drops
  any other key;
* ``params.pt``: ``torch.save`` of the ``nn.ModuleList`` state dict of ``num_hidden_layers``
  ``nn.Linear(d_model, d_model)`` translators: ``"{i}.weight"`` [d, d] (``W``, column
  convention) and ``"{i}.bias"`` [d]. Translator ``i`` maps ``h ↦ h + W_i h + b_i``.

**Layers.** Translator ``i`` reads the Hugging Face ``hidden_states[i]``: ``i = 0`` is the
embedding output, ``i = l + 1`` the output of block ``l``; there are translators for
``i = 0..L-1`` (``hidden_states[L]`` has the final norm applied and needs none). So translator
``i`` is our layer ``i - 1`` (``-1`` = ``blocks.0.hook_resid_pre``, ``l`` =
``blocks.l.hook_resid_post``), with ``A = W.T`` in our ``h + h A + b``; our last layer ``L-1``
is the identity in both. A zero embedding translator is the identity, read as
``include_embedding=False``; a lens without one is written with zeros there.

**Exactness.** The TransformerLens residual equals the HF hidden state when the model's writing
weights are not centred: RMSNorm models always (TransformerLens centres only LayerNorm models)
and LayerNorm models processed without ``center_writing_weights``. Folding norms into weights
and centring ``W_U`` leave the stream alone (the latter shifts every logit of a token equally).
A LayerNorm model with centred writing weights (detected by its embedding rows having zero
mean) carries ``c = P h``, ``P = I - 11ᵀ/d``, and LayerNorm reads ``h`` only through ``P h``:

* writing is exact: ``W = Aᵀ P`` makes ``P(h + W h + b) = P(c + c A + b)``;
* reading is exact only if ``P W 1 = 0`` (then ``P(h + W h + b) = P(c + W c + b)``); a lens
  trained on HF hidden states does not satisfy it and is refused (:class:`LensFileError`),
  since the mean of ``h`` it needs is gone from the TransformerLens stream.

**Unembedding check.** tuned-lens records ``unembed_hash``: SHA-256 of
``np.array_str(W, precision=1)`` of the unembedding weight ``[vocab, d]`` (numpy's summary of a
large matrix: its corner entries to one decimal). For a HF model ``W`` is ``lm_head.weight``,
which TransformerLens folds ``ln_final``'s scale into and centres, so it cannot be recomputed
from a TransformerLens model; for a HookedTransformer tuned-lens hashes ``W_U.T``, which we can.
Loading checks ``d_model``, ``num_hidden_layers`` and the translators' shapes (errors), then
compares the hash with that of ``W_U.T`` and, where they differ, warns
(:class:`TunedLensHashWarning`) saying whether ``base_model_name_or_path`` matches the model's
name. Writing records the hash of ``W_U.T``, so tuned-lens handed the HF model logs its hash
warning (expected). We also write ``beyond_top1_lens.json`` (ignored by tuned-lens) with the
model identity of our own format and ``params.pt``'s SHA-256; where present, loading checks
those as strictly as :func:`~beyond_top1.lenses.io.load_lens` does for our format.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1 import __version__, hooked
from beyond_top1.fileio import to_jsonable
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.io import (
    CONFIG_FILE,
    MODEL_KEYS,
    LensFileError,
    _check_model,
    _model_identity,
    _sha256,
    lens_folder,
    remove_stale,
)
from beyond_top1.lenses.io import TUNED_LENS_PARAMS_FILE as PARAMS_FILE
from beyond_top1.lenses.io import TUNED_LENS_SIDECAR_FILE as SIDECAR_FILE
from beyond_top1.lenses.tuned import TunedLens

LENS_TYPE = "linear_tuned_lens"
TUNED_LENS_FILES = (CONFIG_FILE, PARAMS_FILE, SIDECAR_FILE)


class TunedLensHashWarning(UserWarning):
    """A tuned-lens folder whose unembedding hash could not be matched to the model."""


def _corrupt(directory: Path, problem: str) -> LensFileError:
    return LensFileError(
        f"corrupt or truncated tuned-lens folder {directory}: {problem}. Fetch or write it again."
    )


def unembed_hash(weight: Float[Tensor, "vocab d_model"]) -> str:
    """tuned-lens' ``Unembed.unembedding_hash`` of an unembedding weight (numpy's default print
    options, as tuned-lens runs with)."""
    array = weight.detach().to("cpu", torch.float32).numpy()
    with np.printoptions(
        precision=1, threshold=1000, edgeitems=3, linewidth=75, suppress=False,
        nanstr="nan", infstr="inf", sign="-", floatmode="maxprec", legacy=False,
    ):  # fmt: skip
        text = np.array_str(array, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def model_unembed_hash(model) -> str:
    """The hash tuned-lens computes for this HookedTransformer (of ``W_U.T``)."""
    return unembed_hash(hooked.unembedding(model)[0].T)


def is_tuned_lens_config(config) -> bool:
    """Whether a parsed ``config.json`` is tuned-lens' ``TunedLensConfig`` (its required keys;
    a Hugging Face model's config has ``_name_or_path``, not ``base_model_name_or_path``)."""
    return (
        isinstance(config, dict)
        and "kind" not in config
        and "format_version" not in config
        and {"base_model_name_or_path", "d_model", "num_hidden_layers"} <= set(config)
    )


def is_tuned_lens_folder(directory: str | Path) -> bool:
    try:
        config = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_tuned_lens_config(config)


def centred_residual(model) -> bool:
    """Whether ``model``'s residual stream is centred: a LayerNorm model whose embedding rows
    (and positional rows, if any) all have zero mean over ``d_model``, as TransformerLens'
    ``center_writing_weights`` leaves them (up to rounding: ``|mean| <= 0.01 rms / sqrt(d)``,
    which bf16 rounding meets and an uncentred table's many rows never all do)."""
    if getattr(model.cfg, "normalization_type", None) not in ("LN", "LNPre"):
        return False
    tables = [model.W_E]
    if getattr(model.cfg, "positional_embedding_type", None) == "standard":
        tables.append(model.W_pos)
    for table in tables:
        table = table.detach().float()
        rms = table.pow(2).mean(-1).sqrt()
        if (table.mean(-1).abs() > 1e-2 * rms / table.shape[-1] ** 0.5).any():
            return False
    return True


def _centring(d: int) -> Float[Tensor, "d d"]:
    return torch.eye(d, dtype=torch.float64) - 1.0 / d


def _as_tuned(lens: Lens) -> TunedLens:
    if isinstance(lens, TunedLens):
        return lens
    tuned = TunedLens.from_lens(lens.model, lens)
    probe = torch.randn(4, tuned.d_model, generator=torch.Generator().manual_seed(0))
    probe = probe.to(hooked.model_device(lens.model))
    with torch.no_grad():
        for layer in tuned.source_layers:
            want, got = lens.transform(probe, layer), tuned.transform(probe, layer)
            if not torch.allclose(want, got, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
                raise ValueError(
                    f"a {type(lens).__name__} is not affine at layer {layer}; only affine "
                    "lenses can be written in tuned-lens' format"
                )
    return tuned


def save_tuned_lens(lens: Lens, directory: str | Path) -> Path:
    """Write ``lens`` (a :class:`TunedLens` or any affine lens) as a tuned-lens folder:
    ``params.pt``, ``config.json``, then ``beyond_top1_lens.json``, each atomically.

    Only a new or empty folder, or a lens folder this toolkit wrote, is written to
    (:class:`LensFileError` otherwise); our own format's files in it are removed.
    """
    tuned = _as_tuned(lens)
    model, d, L = tuned.model, tuned.d_model, tuned.n_layers
    centred = centred_residual(model)
    centre = _centring(d) if centred else torch.eye(d, dtype=torch.float64)
    state = {}
    for i in range(L):
        weight, bias = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        if i - 1 in tuned.source_layers:
            j = tuned.source_layers.index(i - 1)
            weight = tuned.weight[j].detach().cpu().double().T @ centre
            bias = tuned.bias[j].detach().cpu().double()
        state[f"{i}.weight"] = weight.float().contiguous()
        state[f"{i}.bias"] = bias.float().contiguous()
    config = {
        "base_model_name_or_path": hooked.model_name(model),
        "d_model": d,
        "num_hidden_layers": L,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": model_unembed_hash(model),
        "lens_type": LENS_TYPE,
    }
    with lens_folder(directory) as folder:
        params = folder.write(PARAMS_FILE, lambda tmp: torch.save(state, tmp))
        folder.write_text(CONFIG_FILE, json.dumps(config) + "\n")
        sidecar = {
            "format": "tuned-lens",
            "beyond_top1_version": __version__,
            "model": _model_identity(model),
            "layers": list(tuned.layers),
            "centred_residual": centred,
            "settings": tuned.config(),
            "params_sha256": _sha256(params),
        }
        folder.write_text(SIDECAR_FILE, json.dumps(to_jsonable(sidecar), indent=2) + "\n")
        remove_stale(folder, keep=TUNED_LENS_FILES)
    return folder.path


def _names(model) -> set[str]:
    names = {hooked.model_name(model)}
    tokenizer = getattr(model, "tokenizer", None)
    names.add(str(getattr(tokenizer, "name_or_path", "") or ""))
    names.add(str(getattr(model.cfg, "tokenizer_name", "") or ""))
    return {n.rstrip("/").rsplit("/", 1)[-1].lower() for n in names if n}


def _check_unembedding(directory: Path, config: dict, model) -> None:
    recorded = config.get("unembed_hash")
    if recorded and recorded == model_unembed_hash(model):
        return
    name = str(config.get("base_model_name_or_path") or "")
    short = name.rstrip("/").rsplit("/", 1)[-1].lower()
    same_name = bool(short) and short in _names(model)
    if not recorded and same_name:
        return
    hash_note = (
        "its unembed_hash differs from this model's W_U (expected for a lens trained on the "
        "Hugging Face model: TransformerLens folds ln_final's scale into W_U and centres it, so "
        "tuned-lens' hash of lm_head.weight cannot be recomputed here)"
        if recorded
        else "it records no unembed_hash"
    )
    name_note = (
        f"its base_model_name_or_path {name!r} matches the model's name"
        if same_name
        else f"its base_model_name_or_path {name!r} does not match the model "
        f"{hooked.model_name(model)!r}"
    )
    warnings.warn(
        f"cannot verify that the tuned-lens folder {directory} was trained for this model: "
        f"{hash_note}; {name_note}. d_model and the number of layers match.",
        TunedLensHashWarning,
        stacklevel=4,  # the caller of load_lens
    )


def _read_params(directory: Path, config: dict, d: int, L: int) -> dict[str, Tensor]:
    path = directory / PARAMS_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip/EOF errors all mean a bad file
        raise _corrupt(directory, f"{PARAMS_FILE} cannot be read ({exc})") from None
    bias = bool(config.get("bias", True))
    expected = {f"{i}.weight": (d, d) for i in range(L)}
    expected |= {f"{i}.bias": (d,) for i in range(L)} if bias else {}
    tensors = isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())
    shapes = {k: tuple(v.shape) for k, v in state.items()} if tensors else None
    if shapes != expected:
        got = sorted(shapes.items())[:4] if shapes else type(state).__name__
        raise _corrupt(
            directory,
            f"{PARAMS_FILE} does not hold {L} translators of d_model {d} "
            f"(expected keys 0.weight [{d}, {d}], 0.bias [{d}], ... ; got {got})",
        )
    return state


def load_tuned_lens(directory: str | Path, model) -> TunedLens:
    """Read a tuned-lens folder into a :class:`TunedLens` of ``model`` (see the module doc for
    the layer mapping, the exactness conditions and the unembedding check).

    Raises:
        LensFileError: the folder is corrupt, of another lens type, sized for another model,
            checked against another model by its ``beyond_top1_lens.json``, or not exactly
            readable on ``model``'s centred LayerNorm residual.
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _corrupt(directory, f"{CONFIG_FILE} cannot be read ({exc})") from None
    if not is_tuned_lens_config(config):
        raise LensFileError(f"{directory} is not a tuned-lens folder")
    if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
        raise LensFileError(
            f"the tuned-lens folder {directory} holds a {config['lens_type']!r} lens; only "
            f"{LENS_TYPE!r} (affine translators) can be read"
        )
    d, L = hooked.d_model(model), hooked.n_layers(model)
    if (config["d_model"], config["num_hidden_layers"]) != (d, L):
        raise LensFileError(
            f"the tuned-lens folder {directory} is for a model with d_model="
            f"{config['d_model']}, {config['num_hidden_layers']} layers "
            f"({config.get('base_model_name_or_path')!r}), but the given model "
            f"{hooked.model_name(model)!r} has d_model={d}, {L} layers. Load it with the model "
            "it was trained for."
        )
    if not (directory / PARAMS_FILE).is_file():
        raise _corrupt(directory, f"{PARAMS_FILE} is missing")
    sidecar = _read_sidecar(directory)
    state = _read_params(directory, config, d, L)
    if sidecar is not None:
        _check_model(directory, sidecar["model"], model)
    else:
        _check_unembedding(directory, config, model)

    weights = [state[f"{i}.weight"].double() for i in range(L)]
    biases = [state.get(f"{i}.bias", torch.zeros(d)).double() for i in range(L)]
    if centred_residual(model):
        for i, weight in enumerate(weights):
            leak = weight.sum(1) - weight.sum(1).mean()
            if leak.abs().max() > 1e-5 * d * float(weight.abs().max()) + 1e-12:
                raise LensFileError(
                    f"cannot read the tuned-lens folder {directory} exactly on "
                    f"{hooked.model_name(model)!r}: that model's writing weights are centred "
                    "(TransformerLens' center_writing_weights), so its residual stream lacks "
                    f"each token's mean, which translator {i} of this lens depends on (its W·1 "
                    "is not a multiple of 1). Load the model without centring its writing "
                    "weights, whose residual is the Hugging Face hidden state: on "
                    "TransformerLens 4, bridge = TransformerBridge.boot_transformers(name); "
                    "bridge.enable_compatibility_mode(center_writing_weights=False); "
                    "beyond_top1.load_model(bridge); on 3.9, HookedTransformer.from_pretrained"
                    "(name, center_writing_weights=False)."
                )
    include_embedding = bool(weights[0].abs().max() > 0 or biases[0].abs().max() > 0)
    lens = TunedLens(model, include_embedding=include_embedding)
    settings = (sidecar or {}).get("settings", {}).get("training")
    lens.training_settings = dict(settings) if isinstance(settings, dict) else {
        "imported_from": "tuned-lens",
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "base_model_revision": config.get("base_model_revision"),
    }  # fmt: skip
    with torch.no_grad():
        for j, layer in enumerate(lens.source_layers):
            lens.weight[j] = weights[layer + 1].T.to(lens.weight)
            lens.bias[j] = biases[layer + 1].to(lens.bias)
    return lens.eval()


def _read_sidecar(directory: Path) -> dict | None:
    """``beyond_top1_lens.json`` (checked against ``params.pt``), or None where absent."""
    path = directory / SIDECAR_FILE
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
        identity, digest = sidecar["model"], sidecar["params_sha256"]
        if not isinstance(identity, dict) or not {"model_name", *MODEL_KEYS} <= set(identity):
            raise TypeError("its model entry lacks the model's identity")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(directory, f"{SIDECAR_FILE} cannot be read ({exc})") from None
    if _sha256(directory / PARAMS_FILE) != digest:
        raise _corrupt(
            directory,
            f"{PARAMS_FILE} does not match the checksum in {SIDECAR_FILE} (truncated, or "
            f"replaced by another program: delete {SIDECAR_FILE} to read it as a plain "
            "tuned-lens folder)",
        )
    return sidecar


__all__ = [
    "TunedLensHashWarning",
    "centred_residual",
    "is_tuned_lens_folder",
    "load_tuned_lens",
    "model_unembed_hash",
    "save_tuned_lens",
    "unembed_hash",
]
