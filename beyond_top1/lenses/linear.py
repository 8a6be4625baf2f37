"""The linear-shortcut lens (``mat``, "Jump to Conclusions", 004).

Each layer ``l < L-1`` gets a matrix ``A_l`` fitted by least squares so that ``h_l A_l ≈ h_{L-1}``
(``resid_post``); the lens then applies the model's final norm and unembedding. At ``L-1`` the
map is the identity, so the lens reproduces the model's logits. The fit streams the texts once,
accumulating the normal equations (:mod:`beyond_top1.lenses.least_squares`), so its memory does
not depend on the number of texts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1 import distributed, hooked
from beyond_top1.activations import resolve_layers, stream_residuals
from beyond_top1.data import DEFAULT_MAX_LEN, DEFAULT_SCORE_FIRST
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.io import register_lens_kind
from beyond_top1.lenses.least_squares import DEFAULT_RIDGE, LeastSquaresAccumulator


@dataclass
class LinearMaps:
    """Least-squares maps ``h_target ≈ h_source @ weight[i] (+ bias[i])``, float64."""

    source_layers: tuple[int, ...]
    target_layer: int
    weight: Float[Tensor, "source d_model d_model"]
    bias: Float[Tensor, "source d_model"] | None
    n_tokens: int
    n_texts: int


def fit_linear_maps(
    model,
    texts: Iterable[str],
    source_layers: Sequence[int],
    target_layer: int,
    *,
    bias: bool = False,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> LinearMaps:
    """Fit maps from every layer in ``source_layers`` to ``target_layer`` in one pass over texts.

    Layers are ``0..L-1`` (``resid_post``) or ``-1`` (embedding); any pair is allowed. ``ridge``
    is relative to the mean diagonal of ``XᵀX`` (see :mod:`~beyond_top1.lenses.least_squares`).
    One forward pass per batch caches all the layers; memory is ``O(n_sources · d_model²)``.
    ``score_first``: also fit on position 0 of a model without BOS (the attention sink, whose
    residual norm can dwarf every other position's; see :mod:`beyond_top1.data`).
    """
    layers = resolve_layers(model, (*source_layers, target_layer))
    sources, target = layers[:-1], layers[-1]
    d = hooked.d_model(model)
    accumulator = LeastSquaresAccumulator(
        d, d, bias=bias, n_maps=len(sources), device=hooked.model_device(model)
    )
    where = distributed.ranks()  # under torchrun: this rank's batches, then an all-reduce
    stream = {"batch_size": batch_size, "max_len": max_len, "progress": progress}
    stream["score_first"] = score_first
    batches = stream_residuals(model, texts, layers=layers, **distributed.sharded(stream, where))

    def accumulate() -> int:
        n_texts = 0
        for batch in batches:
            if len(batch):
                accumulator.update(batch.resid[:, :-1], batch.resid[:, -1])
                n_texts = max(n_texts, int(batch.text_ids.max()) + 1)
        return n_texts

    n_texts = max(distributed.all_gather(distributed.run_checked(accumulate, where), where))
    accumulator.all_reduce(where)
    if accumulator.n_tokens == 0:
        raise ValueError("the texts have no scored tokens to fit on")
    weight, offset = accumulator.solve(ridge)
    return LinearMaps(sources, target, weight, offset, accumulator.n_tokens, n_texts)


@register_lens_kind
class LinearShortcutLens(Lens):
    """``h_l @ A_l (+ b_l)`` for source layers ``0..L-2`` (and ``-1``), the identity at ``L-1``.

    Buffers ``weight [n_source_layers, d_model, d_model]`` and ``bias [n_source_layers,
    d_model]`` (zeros unless ``bias=True``). An unfitted lens holds identity maps, i.e. it is the
    logit lens; use :meth:`fit`.
    """

    kind = "linear"

    def __init__(self, model, *, include_embedding: bool = False, bias: bool = False):
        super().__init__(model)
        self.include_embedding = include_embedding
        self.use_bias = bias
        first = -1 if include_embedding else 0
        self.source_layers = tuple(range(first, self.n_layers - 1))
        n, d = len(self.source_layers), self.d_model
        device = hooked.model_device(model)
        self.register_buffer("weight", torch.eye(d, device=device).repeat(n, 1, 1))
        self.register_buffer("bias", torch.zeros(n, d, device=device))
        self.fit_settings: dict = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return (*self.source_layers, self.n_layers - 1)

    def transform(
        self, resid: Float[Tensor, "... d_model"], layer: int
    ) -> Float[Tensor, "... d_model"]:
        if layer == self.n_layers - 1:
            return resid
        if layer not in self.source_layers:
            raise ValueError(f"no linear map for layer {layer}; this lens maps {self.layers}")
        i = self.source_layers.index(layer)
        mapped = resid @ self.weight[i].to(resid.dtype)
        return mapped + self.bias[i].to(resid.dtype) if self.use_bias else mapped

    def config(self) -> dict:
        return {
            "include_embedding": self.include_embedding,
            "bias": self.use_bias,
            "fit": self.fit_settings,
        }

    @classmethod
    def from_config(cls, model, config: dict) -> LinearShortcutLens:
        lens = cls(
            model,
            include_embedding=bool(config.get("include_embedding", False)),
            bias=bool(config.get("bias", False)),
        )
        lens.fit_settings = dict(config.get("fit", {}))
        return lens

    @classmethod
    def fit(
        cls,
        model,
        texts: Iterable[str],
        *,
        bias: bool = False,
        ridge: float = DEFAULT_RIDGE,
        include_embedding: bool = False,
        batch_size: int = 8,
        max_len: int | None = None,
        description: str | None = None,
        progress: bool = True,
        score_first: bool = DEFAULT_SCORE_FIRST,
    ) -> LinearShortcutLens:
        """Fit every map by least squares on ``texts`` (one streamed pass) and return the lens.

        Args:
            bias: also fit an offset ``b_l`` (004's ``mat`` has none).
            ridge: relative ridge, ``λ = ridge · mean(diag XᵀX)`` per layer; the bias is not
                penalised.
            max_len: tokens per text (default 128, or the model's context if shorter).
            description: how the texts were chosen, stored in the saved config.
            score_first: also fit on position 0 of a model without BOS (see
                :func:`fit_linear_maps`).
        """
        lens = cls(model, include_embedding=include_embedding, bias=bias)
        start = time.perf_counter()
        maps = fit_linear_maps(
            model,
            texts,
            lens.source_layers,
            lens.n_layers - 1,
            bias=bias,
            ridge=ridge,
            batch_size=batch_size,
            max_len=max_len,
            progress=progress,
            score_first=score_first,
        )
        with torch.no_grad():
            lens.weight.copy_(maps.weight)
            if maps.bias is not None:
                lens.bias.copy_(maps.bias)
        lens.fit_settings = {
            "method": "least_squares",
            "target_layer": maps.target_layer,
            "ridge": ridge,
            "ridge_scale": "mean_diagonal",
            "n_tokens": maps.n_tokens,
            "n_texts": maps.n_texts,
            "texts": description,
            "max_len": max_len or min(DEFAULT_MAX_LEN, hooked.n_ctx(model)),
            "batch_size": batch_size,
            "score_first": bool(score_first),
            "seconds": round(time.perf_counter() - start, 2),
        }
        return lens.eval()


__all__ = ["LinearMaps", "LinearShortcutLens", "fit_linear_maps"]
