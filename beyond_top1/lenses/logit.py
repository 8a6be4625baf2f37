"""The logit lens: final norm + unembedding applied to each layer's own residual."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.io import register_lens_kind


@register_lens_kind
class LogitLens(Lens):
    """``logits_l = unembed(ln_final(h_l))``, with the norm scale recomputed from ``h_l``.

    The norm scale of layer ``l`` is never borrowed from the final layer (docs/conventions.md).
    """

    kind = "logit"

    def transform(
        self, resid: Float[Tensor, "... d_model"], layer: int
    ) -> Float[Tensor, "... d_model"]:
        return resid
