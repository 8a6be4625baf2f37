"""One way to turn what a user passes as ``lens=`` into a lens of the model at hand."""

from __future__ import annotations

from pathlib import Path

from beyond_top1 import hooked
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.io import load_lens
from beyond_top1.lenses.logit import LogitLens


def resolve_lens(model, lens: Lens | str | Path | None = None, *, name: str = "lens") -> Lens:
    """``lens`` as a :class:`Lens` of ``model``.

    ``None`` or ``"logit"``: the logit lens; another string or a path: the lens saved in that
    folder (checked against ``model``); a :class:`Lens`: checked to wrap this very model object.
    """
    if lens is None or (isinstance(lens, str) and lens.strip() == "logit"):
        return LogitLens(model)
    if isinstance(lens, str | Path):
        return load_lens(lens, model)
    if not isinstance(lens, Lens):
        raise TypeError(
            f"{name} must be a Lens, 'logit' or a saved lens folder, got {type(lens).__name__}"
        )
    if lens.model is not model:
        raise ValueError(
            f"the {name} was built for another model object ({hooked.model_name(lens.model)!r}, "
            f"not this {hooked.model_name(model)!r}): build or load it with the model you pass"
        )
    return lens


def lens_set(
    model, *, linear: Lens | str | Path | None = None, tuned: Lens | str | Path | None = None
) -> dict[str, Lens]:
    """``{"logit": ..., "linear": ..., "tuned": ...}``: the logit lens of ``model`` and those of
    ``linear`` and ``tuned`` that are given (a lens or a saved lens folder, checked)."""
    lenses = {"logit": LogitLens(model)}
    for name, lens in (("linear", linear), ("tuned", tuned)):
        if lens is not None:
            lenses[name] = resolve_lens(model, lens, name=f"{name} lens")
    return lenses


__all__ = ["lens_set", "resolve_lens"]
