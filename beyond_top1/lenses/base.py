"""The lens interface: read any layer's residual stream as next-token logits."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from jaxtyping import Float
from torch import Tensor, nn

from beyond_top1 import hooked
from beyond_top1.lenses.io import save_lens


class Lens(nn.Module):
    """A map from layer ``l``'s residual stream to logits over the vocabulary.

    Subclasses implement :meth:`transform`, which maps ``resid`` at ``layer`` into the space of
    the last layer's ``resid_post``; :meth:`forward` then applies the model's own final norm (its
    scale recomputed from the transformed residual) and unembedding. At ``layer = L-1`` every lens
    is the identity and reproduces the model's logits.

    The model is held by reference and is not part of the lens' parameters or ``state_dict``.

    Saving protocol (:mod:`beyond_top1.lenses.io`): a lens is rebuilt as
    ``cls.from_config(model, lens.config())`` followed by ``load_state_dict``, so subclasses with
    settings or weights override :meth:`config` and :meth:`from_config`.
    """

    kind: ClassVar[str] = "lens"

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "model", model)  # not registered: the lens does not own it
        self.n_layers = hooked.n_layers(model)
        self.d_model = hooked.d_model(model)

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers this lens reads (``-1`` = embedding)."""
        return tuple(range(-1, self.n_layers))

    def transform(
        self, resid: Float[Tensor, "... d_model"], layer: int
    ) -> Float[Tensor, "... d_model"]:
        raise NotImplementedError

    def forward(
        self, resid: Float[Tensor, "... d_model"], layer: int
    ) -> Float[Tensor, "... vocab"]:
        hooked.check_layer(self.model, layer)
        if layer not in self.layers:
            raise ValueError(f"{type(self).__name__} has no map for layer {layer}")
        return hooked.unembed(
            self.model, hooked.final_norm(self.model, self.transform(resid, layer))
        )

    def config(self) -> dict:
        """Lens-specific settings (JSON-serialisable), enough to rebuild an empty lens."""
        return {}

    @classmethod
    def from_config(cls, model, config: dict) -> Lens:
        """An empty lens of the right shapes for ``model``, from :meth:`config`'s output."""
        return cls(model)

    def save(self, directory: str | Path, *, format: str = "beyond-top1") -> Path:
        """Write this lens to ``directory`` (see :func:`beyond_top1.lenses.io.save_lens`;
        ``format="tuned-lens"`` for the tuned-lens package's folders)."""
        return save_lens(self, directory, format=format)

    def extra_repr(self) -> str:
        return f"model={hooked.model_name(self.model)!r}, n_layers={self.n_layers}"
