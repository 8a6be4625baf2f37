"""One prompt, layer by layer: its top-k tokens per layer (:func:`top_tokens`) and its rank
trajectories (:func:`trajectory`).

:func:`trajectory` reads every layer of one prompt through a lens (the same kernel as
:func:`~beyond_top1.scans.scan`, :func:`~beyond_top1.ranking.lens_topk`) and keeps, per position,
the lens' top-k tokens at every layer, the rank of each final top-k token at every layer, the
saturation layers ``s_1..s_k`` and the final log-prob and rank of the actual next token. The
:class:`Trajectory` holds no model; it renders itself inline in Jupyter (CircuitsVis) through
:mod:`beyond_top1.viz`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.activations import resolve_layers
from beyond_top1.data import tokenize
from beyond_top1.lenses import Lens, resolve_lens
from beyond_top1.ranking import PRECISIONS, lens_topk
from beyond_top1.saturation import saturation_layers
from beyond_top1.viz import trajectory_view


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


@dataclass
class Trajectory:
    """Per-position, per-layer top-k readouts of one prompt under one lens.

    Positions are the prompt's tokens (``pos``); the prediction at ``pos`` is for token
    ``pos + 1``. Layers are ``0..L-1`` (``resid_post``); ranks are 1-based.

    Attributes:
        prompt: the text.
        token_ids: ``[pos]`` the prompt's token ids (with BOS if the model prepends one).
        tokens: ``[pos]`` each token decoded on its own.
        top_ids: ``[pos, L, k]`` the lens' top-k ids at every layer (rank order).
        top_logprobs: ``[pos, L, k]`` their log-probs under the lens.
        final_ranks: ``[pos, L, k]`` rank of final token ``i`` (``top_ids[:, -1, i]``) at every
            layer.
        s: ``[pos, k]`` saturation layers ``s_1..s_k``.
        next_logprob: ``[pos]`` final log-prob of the actual next token (NaN at the last
            position).
        next_rank: ``[pos]`` its final rank (``-1`` at the last position); exact within the top
            k, counted on fp32 logits beyond it.
        vocab: decoded string of every token id that appears above.
        settings: model name, lens kind, k, L, precision.
    """

    prompt: str
    token_ids: Int[np.ndarray, " pos"]
    tokens: list[str]
    top_ids: Int[np.ndarray, "pos layer k"]
    top_logprobs: Float[np.ndarray, "pos layer k"]
    final_ranks: Int[np.ndarray, "pos layer k"]
    s: Int[np.ndarray, "pos k"]
    next_logprob: Float[np.ndarray, " pos"]
    next_rank: Int[np.ndarray, " pos"]
    vocab: dict[int, str] = field(repr=False)
    settings: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.top_ids.shape[1])

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[2])

    @property
    def n_positions(self) -> int:
        return int(self.top_ids.shape[0])

    @property
    def lens_name(self) -> str:
        return str(self.settings.get("lens", "lens"))

    def __len__(self) -> int:
        return self.n_positions

    def position(self, position: int) -> int:
        """``position`` as a non-negative index (negative counts from the end)."""
        n = self.n_positions
        if not -n <= position < n:
            raise IndexError(f"position {position} is outside the prompt's {n} tokens")
        return position % n

    def token_strings(self, ids) -> list[str]:
        """Decoded strings of token ids that appear in this trajectory."""
        return [self.vocab[int(i)] for i in np.asarray(ids).ravel()]

    def top_tokens(self, position: int = -1) -> pd.DataFrame:
        """Top-k tokens at ``position`` for every layer: ``layer, rank, token_id, token, prob``."""
        p = self.position(position)
        L, k = self.n_layers, self.k
        ids = self.top_ids[p].reshape(-1)
        return pd.DataFrame(
            {
                "layer": np.repeat(np.arange(L), k),
                "rank": np.tile(np.arange(1, k + 1), L),
                "token_id": ids.astype(np.int64),
                "token": self.token_strings(ids),
                "prob": np.exp(self.top_logprobs[p].reshape(-1).astype(np.float64)),
            }
        )

    def ranks(self, position: int = -1) -> pd.DataFrame:
        """Rank of each final top-k token at ``position`` for every layer.

        Columns ``layer, final_rank, token_id, token, rank`` (``final_rank`` = i, the token's
        rank at the last layer; ``rank`` = its rank under the lens at ``layer``).
        """
        p = self.position(position)
        L, k = self.n_layers, self.k
        final = self.top_ids[p, -1]
        return pd.DataFrame(
            {
                "layer": np.repeat(np.arange(L), k),
                "final_rank": np.tile(np.arange(1, k + 1), L),
                "token_id": np.tile(final, L).astype(np.int64),
                "token": self.token_strings(np.tile(final, L)),
                "rank": self.final_ranks[p].reshape(-1).astype(np.int64),
            }
        )

    @property
    def saturation(self) -> pd.DataFrame:
        """One row per position: ``pos, token, s_1..s_k, top_1..top_k`` (the final top-k)."""
        frame = pd.DataFrame({"pos": np.arange(self.n_positions), "token": self.tokens})
        for i in range(self.k):
            frame[f"s_{i + 1}"] = self.s[:, i].astype(np.int64)
        for i in range(self.k):
            frame[f"top_{i + 1}"] = self.token_strings(self.top_ids[:, -1, i])
        frame.attrs["n_layers"] = self.n_layers
        return frame

    def render(self, **kwargs):
        """The default inline view (:func:`beyond_top1.viz.trajectory_view`)."""
        return trajectory_view(self, **kwargs)

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"Trajectory({self.n_positions} tokens, model={s.get('model_name')!r}, "
            f"lens={self.lens_name!r}, k={self.k}, L={self.n_layers})"
        )

    def _repr_html_(self) -> str:
        return self.render()._repr_html_()


def trajectory(
    model,
    prompt: str,
    lens: Lens | None = None,
    k: int = 5,
    *,
    precision: str = "fp32",
) -> Trajectory:
    """Top-k tokens at every position and layer of ``prompt`` under ``lens`` (default: logit lens).

    Args:
        model: a ``HookedTransformer``.
        prompt: the text (at most the model's context; BOS is prepended if the model expects it).
        lens: a :class:`~beyond_top1.lenses.Lens` of ``model``, ``"logit"`` (the default) or
            a saved lens folder.
        k: ranks to track.
        precision: ``"fp32"`` or ``"bf16"`` (see :mod:`beyond_top1.ranking`).

    Returns:
        A :class:`Trajectory` (renders inline in Jupyter).
    """
    lens = resolve_lens(model, lens)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    L = hooked.n_layers(model)
    layers = tuple(range(L))
    ids, resid = prompt_residuals(model, prompt, layers)
    readout = lens_topk(lens, resid, layers, k, precision=precision)
    s = saturation_layers(readout.top_ids)
    with torch.inference_mode():
        logits = lens(resid[:, -1], L - 1).float()  # the model's own logits [pos, vocab]
        ids_t = torch.tensor(ids, device=logits.device)
        next_ids = ids_t[1:]
        target = logits[:-1].gather(-1, next_ids[:, None])
        next_logprob = (target[:, 0] - logits[:-1].logsumexp(-1)).cpu().numpy()
        # within the final top-k the exact rule's rank; beyond it, counted on fp32 logits
        final_ids = readout.final_ids[:-1]
        match = final_ids == next_ids[:, None]
        counted = ((logits[:-1] > target).sum(-1) + 1).clamp_min(k + 1)
        next_rank = torch.where(match.any(-1), match.int().argmax(-1) + 1, counted).cpu().numpy()
    top_ids = readout.top_ids.cpu().numpy().astype(np.int64)
    unique = np.unique(np.concatenate([top_ids.ravel(), np.asarray(ids, dtype=np.int64)]))
    vocab = dict(zip(unique.tolist(), hooked.token_strings(model, unique), strict=True))
    return Trajectory(
        prompt=prompt,
        token_ids=np.asarray(ids, dtype=np.int64),
        tokens=[vocab[i] for i in ids],
        top_ids=top_ids,
        top_logprobs=readout.top_logprobs.cpu().numpy().astype(np.float32),
        final_ranks=readout.final_ranks.cpu().numpy().astype(np.int64),
        s=s.cpu().numpy().astype(np.int64),
        next_logprob=np.append(next_logprob, np.nan).astype(np.float32),
        next_rank=np.append(next_rank, -1).astype(np.int64),
        vocab=vocab,
        settings={
            "model_name": hooked.model_name(model),
            "lens": lens.kind,
            "k": k,
            "n_layers": L,
            "precision": precision,
        },
    )


__all__ = ["Trajectory", "format_top_tokens", "prompt_residuals", "top_tokens", "trajectory"]
