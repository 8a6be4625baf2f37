"""Read one prompt through a lens: top-k tokens per layer as a tidy DataFrame."""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.activations import resolve_layers
from beyond_top1.data import tokenize
from beyond_top1.lenses import Lens, LogitLens


def prompt_residuals(
    model, prompt: str, layers=None
) -> tuple[list[int], Float[Tensor, "pos layer d_model"]]:
    """Token ids of ``prompt`` and its residual streams at ``layers`` (default ``0..L-1``)."""
    ids = tokenize(model, prompt)
    layers = resolve_layers(model, layers)
    tokens = torch.tensor([ids], device=hooked.model_device(model))
    return ids, hooked.run_with_residuals(model, tokens, layers)[0]


def top_tokens(
    model,
    prompt: str,
    *,
    lens: Lens | None = None,
    k: int = 5,
    position: int = -1,
    include_embedding: bool = False,
) -> pd.DataFrame:
    """Top-``k`` next tokens at ``position`` of ``prompt`` under ``lens``, for every layer.

    Returns a DataFrame with one row per (layer, rank): ``layer, rank, token_id, token, prob``
    (ranks are 1-based; ``layer = -1`` is the embedding when ``include_embedding``).
    """
    lens = lens if lens is not None else LogitLens(model)
    vocab = hooked.d_vocab(model)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    layers = tuple(range(-1 if include_embedding else 0, hooked.n_layers(model)))
    ids, resid = prompt_residuals(model, prompt, layers)
    if not -len(ids) <= position < len(ids):
        raise IndexError(f"position {position} is outside the prompt's {len(ids)} tokens")
    rows = []
    with torch.inference_mode():
        for j, layer in enumerate(layers):
            probs = lens(resid[position, j], layer).float().softmax(-1)
            values, indices = probs.topk(k)
            for rank, (p, i) in enumerate(
                zip(values.tolist(), indices.tolist(), strict=True), start=1
            ):
                rows.append((layer, rank, i, p))
    frame = pd.DataFrame(rows, columns=["layer", "rank", "token_id", "prob"])
    frame.insert(3, "token", hooked.token_strings(model, frame["token_id"]))
    return frame


def format_top_tokens(frame: pd.DataFrame) -> str:
    """A layers × ranks text table of ``token (prob)`` cells."""
    cells = frame.assign(
        cell=[f"{t!r} {p:.2f}" for t, p in zip(frame["token"], frame["prob"], strict=True)]
    )
    table = cells.pivot(index="layer", columns="rank", values="cell")
    table.columns = [f"top-{r}" for r in table.columns]
    return table.to_string()
