"""Read one prompt through a lens: top-k tokens per layer as a tidy DataFrame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.activations import resolve_layers
from beyond_top1.data import tokenize
from beyond_top1.lenses import Lens, resolve_lens
from beyond_top1.ranking import lens_topk


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
    (ranks are 1-based; ``layer = -1`` is the embedding when ``include_embedding``). The ids and
    their order follow the exact read-out rule (:mod:`beyond_top1.ranking`).
    """
    lens = resolve_lens(model, lens)
    vocab = hooked.d_vocab(model)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    layers = tuple(range(-1 if include_embedding else 0, hooked.n_layers(model)))
    ids, resid = prompt_residuals(model, prompt, layers)
    if not -len(ids) <= position < len(ids):
        raise IndexError(f"position {position} is outside the prompt's {len(ids)} tokens")
    readout = lens_topk(lens, resid[position][None], layers, k)
    frame = pd.DataFrame(
        {
            "layer": np.repeat(layers, k),
            "rank": np.tile(np.arange(1, k + 1), len(layers)),
            "token_id": readout.top_ids[0].reshape(-1).cpu().numpy(),
            "prob": readout.top_logprobs[0].reshape(-1).double().exp().cpu().numpy(),
        }
    )
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
