"""Prompts, layer by layer: their top-k tokens per layer (:func:`top_tokens`) and their
trajectories (:func:`trajectory`), for one prompt or a batch, with chosen target tokens.

:func:`trajectory` reads every layer through a lens (the same kernel as
:func:`~beyond_top1.scans.scan`, :func:`~beyond_top1.ranking.lens_topk`) and keeps, per position,
the lens' top-k tokens at every layer, the rank of each final top-k token at every layer, the
saturation layers ``s_1..s_k``, the entropy and KL to the final layer of every cell, and, for
chosen ``targets``, their exact rank, log-prob and logit at every layer and position
(:mod:`beyond_top1.cell_stats`). A :class:`Trajectory` holds no model; it renders itself inline
in Jupyter through :mod:`beyond_top1.viz`.

Batches. A list of prompts runs as right-padded batches (padding after a causal model's real
tokens cannot change them) and gives a :class:`TrajectoryBatch`; ``fwd_hooks`` are
TransformerLens hooks active during the run (a patched run next to a clean one, see
:func:`beyond_top1.viz.diff`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import hooked
from beyond_top1.activations import resolve_layers
from beyond_top1.cell_stats import cell_stats
from beyond_top1.data import make_token_batch, tokenize
from beyond_top1.lenses import Lens, resolve_lens
from beyond_top1.ranking import PRECISIONS, lens_topk
from beyond_top1.saturation import saturation_layers
from beyond_top1.viz import trajectory_view

NEXT = "next"  # targets="next": the actual next token at every position
PROMPT_BATCH = 8  # prompts per forward pass


def _as_prompts(prompts) -> tuple[list[str], bool]:
    """``(prompts as a list, whether one prompt was given)``."""
    if isinstance(prompts, str):
        return [prompts], True
    if not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("give a prompt (a string) or a non-empty list of prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a string")
    return list(prompts), False


def _as_hooks(fwd_hooks) -> list[tuple[str, object]]:
    """``fwd_hooks`` as a list of TransformerLens ``(hook name, function)`` pairs."""
    if fwd_hooks is None:
        return []
    if isinstance(fwd_hooks, tuple) and len(fwd_hooks) == 2 and isinstance(fwd_hooks[0], str):
        fwd_hooks = [fwd_hooks]  # one pair given on its own
    hooks = list(fwd_hooks)
    for hook in hooks:
        if not (
            isinstance(hook, tuple | list)
            and len(hook) == 2
            and isinstance(hook[0], str)
            and callable(hook[1])
        ):
            raise TypeError(
                "fwd_hooks must be (hook name, function) pairs, e.g. "
                "[('blocks.3.hook_resid_post', fn)]"
            )
    return [tuple(hook) for hook in hooks]


def tokenize_prompts(model, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (with BOS if the model prepends one); errors name the prompt."""
    token_lists = []
    for i, prompt in enumerate(prompts):
        try:
            token_lists.append(tokenize(model, prompt))
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}" if len(prompts) > 1 else str(exc)) from None
    return token_lists


def residuals_of_ids(
    model, token_lists: Sequence[Sequence[int]], layers, *, fwd_hooks=()
) -> list[Float[Tensor, "pos layer d_model"]]:
    """Residual streams at ``layers`` of each token list, run in right-padded batches of
    :data:`PROMPT_BATCH`. With ``fwd_hooks`` only lists of equal length share a batch, so a
    hook sees no padding and a position means the same in every row."""
    hooks = _as_hooks(fwd_hooks)
    tok = hooked.tokenizer(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = list(range(len(token_lists)))
    if hooks:
        order.sort(key=lambda i: len(token_lists[i]))  # stable: equal lengths keep their order
    groups: list[list[int]] = []
    for i in order:
        same = hooks and groups and len(token_lists[groups[-1][0]]) != len(token_lists[i])
        if not groups or len(groups[-1]) == PROMPT_BATCH or same:
            groups.append([])
        groups[-1].append(i)
    out: list = [None] * len(token_lists)
    for group in groups:
        chunk = [token_lists[i] for i in group]
        batch = make_token_batch(chunk, range(len(chunk)), pad_id=pad_id, skip_first=False)
        tokens = batch.tokens.to(hooked.model_device(model))
        resid = hooked.run_with_residuals(model, tokens, layers, fwd_hooks=hooks)
        for row, i in enumerate(group):
            out[i] = resid[row, : len(token_lists[i])]
    return out


def prompts_residuals(
    model, prompts: Sequence[str], layers=None, *, fwd_hooks=()
) -> list[tuple[list[int], Float[Tensor, "pos layer d_model"]]]:
    """Token ids and residual streams at ``layers`` (default ``0..L-1``) of each prompt.

    Prompts run in right-padded batches (:func:`residuals_of_ids`); ``fwd_hooks``
    (TransformerLens ``(name, hook)`` pairs) are active during every forward pass.
    """
    layers = resolve_layers(model, layers)
    token_lists = tokenize_prompts(model, prompts)
    resid = residuals_of_ids(model, token_lists, layers, fwd_hooks=fwd_hooks)
    return list(zip(token_lists, resid, strict=True))


def prompt_residuals(
    model, prompt: str, layers=None, *, fwd_hooks=()
) -> tuple[list[int], Float[Tensor, "pos layer d_model"]]:
    """Token ids of ``prompt`` and its residual streams at ``layers`` (default ``0..L-1``)."""
    return prompts_residuals(model, [prompt], layers, fwd_hooks=fwd_hooks)[0]


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def single_token_id(model, target: str | int) -> int:
    """The token id of ``target``: an id, or a string that is exactly one token."""
    vocab = hooked.d_vocab(model)
    if isinstance(target, bool) or not isinstance(target, str | int | np.integer):
        raise TypeError(f"a target is a string or a token id, got {type(target).__name__}")
    if isinstance(target, str):
        ids = hooked.tokenizer(model)(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = hooked.token_strings(model, ids)
            raise ValueError(
                f"target {target!r} is {len(ids)} tokens {pieces}, not one. Give a string that "
                "is one token (mind the leading space where the tokenizer marks it, as GPT-2 "
                "and SmolLM2 do: ' Rome', not 'Rome') or a token id."
            )
        return int(ids[0])
    if not 0 <= int(target) < vocab:
        raise ValueError(f"token id {int(target)} is outside the vocabulary 0..{vocab - 1}")
    return int(target)


def resolve_targets(model, targets, token_ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Per-position target ids ``[pos, n]`` (``-1`` = none) and a label per target.

    ``targets``: ``None``; ``"next"`` (the actual next token; none at the last position); a
    string or id, or a list of them (the same targets at every position; ``"next"`` may be one
    of them); or an array/tensor of ids per position, ``[pos]`` or ``[pos, n]`` (``-1`` = none).
    """
    n_pos = len(token_ids)
    if targets is None:
        return np.zeros((n_pos, 0), dtype=np.int64), []
    if isinstance(targets, str) and targets == NEXT:
        ids = np.full((n_pos, 1), -1, dtype=np.int64)
        ids[:-1, 0] = np.asarray(token_ids[1:], dtype=np.int64)
        return ids, ["next token"]
    if isinstance(targets, np.ndarray | Tensor):
        ids = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets)
        if ids.ndim == 1:
            ids = ids[:, None]
        if ids.ndim != 2 or ids.shape[0] != n_pos or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"per-position targets must be integer ids of shape [{n_pos}] or [{n_pos}, n] "
                f"(one row per prompt token), got {ids.dtype} {tuple(ids.shape)}"
            )
        vocab = hooked.d_vocab(model)
        if ((ids < -1) | (ids >= vocab)).any():
            raise ValueError(f"target ids must lie in 0..{vocab - 1} (or -1 for none)")
        labels = (
            ["target"] if ids.shape[1] == 1 else [f"target {i + 1}" for i in range(ids.shape[1])]
        )
        return ids.astype(np.int64), labels
    items = [targets] if isinstance(targets, str | int | np.integer) else list(targets)
    if not items:
        raise ValueError("targets is empty; pass None for no targets")
    next_ids, _ = resolve_targets(model, NEXT, token_ids)
    columns, labels, ids = [], [], []
    for item in items:
        if isinstance(item, str) and item == NEXT:
            columns.append(next_ids[:, 0])
            labels.append("next token")
            continue
        token = single_token_id(model, item)
        if token in ids:
            raise ValueError(f"target {item!r} is given twice; give each token once")
        ids.append(token)
        columns.append(np.full(n_pos, token, dtype=np.int64))
        labels.append(item if isinstance(item, str) else hooked.token_strings(model, [token])[0])
    if labels.count("next token") > 1:
        raise ValueError("'next' is given twice; give each target once")
    seen = [label for label in labels if labels.count(label) > 1]
    if seen:  # different ids that decode alike (e.g. byte tokens): keep them apart
        labels = [
            f"{label} #{int(column[0])}" if label in seen else label
            for label, column in zip(labels, columns, strict=True)
        ]
    return np.stack(columns, axis=1), labels


# ---------------------------------------------------------------------------------------------
# Top-k tables
# ---------------------------------------------------------------------------------------------


def top_tokens(
    model,
    prompt: str | Sequence[str],
    *,
    lens: Lens | None = None,
    k: int = 5,
    position: int = -1,
    include_embedding: bool = False,
    fwd_hooks=(),
) -> pd.DataFrame:
    """Top-``k`` next tokens at ``position`` of ``prompt`` under ``lens``, for every layer.

    Returns a DataFrame with one row per (layer, rank): ``layer, rank, token_id, token, prob``
    (ranks are 1-based; ``layer = -1`` is the embedding when ``include_embedding``). The ids and
    their order follow the exact read-out rule (:mod:`beyond_top1.ranking`). A list of prompts
    adds a first column ``prompt`` (its index); ``position`` counts in each prompt.
    ``fwd_hooks`` are TransformerLens hooks active during the forward pass.
    """
    lens = resolve_lens(model, lens)
    prompts, single = _as_prompts(prompt)
    vocab = hooked.d_vocab(model)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    layers = tuple(range(-1 if include_embedding else 0, hooked.n_layers(model)))
    frames = []
    runs = prompts_residuals(model, prompts, layers, fwd_hooks=fwd_hooks)
    for i, (ids, _) in enumerate(runs):
        if not -len(ids) <= position < len(ids):
            where = "the prompt" if single else f"prompt {i}"
            raise IndexError(f"position {position} is outside {where}'s {len(ids)} tokens")
    rows = torch.stack([resid[position] for _, resid in runs])
    readout = lens_topk(lens, rows, layers, k)
    for i in range(len(runs)):
        frame = pd.DataFrame(
            {
                "layer": np.repeat(layers, k),
                "rank": np.tile(np.arange(1, k + 1), len(layers)),
                "token_id": readout.top_ids[i].reshape(-1).cpu().numpy(),
                "prob": readout.top_logprobs[i].reshape(-1).double().exp().cpu().numpy(),
            }
        )
        frame.insert(3, "token", hooked.token_strings(model, frame["token_id"]))
        if not single:
            frame.insert(0, "prompt", i)
        frames.append(frame)
    return frames[0] if single else pd.concat(frames, ignore_index=True)


def top_tokens_table(frame: pd.DataFrame) -> pd.DataFrame:
    """A layers × ranks table of ``token prob`` cells from :func:`top_tokens` (one prompt)."""
    if "prompt" in frame and frame["prompt"].nunique() > 1:
        raise ValueError("pick one prompt first, e.g. frame[frame.prompt == 0]")
    cells = frame.assign(
        cell=[f"{t!r} {p:.2f}" for t, p in zip(frame["token"], frame["prob"], strict=True)]
    )
    table = cells.pivot(index="layer", columns="rank", values="cell")
    table.columns = [f"top-{r}" for r in table.columns]
    return table


def format_top_tokens(frame: pd.DataFrame):
    """:func:`top_tokens_table` as a pandas ``Styler``: a table in Jupyter with each cell
    shaded by its probability (``.to_string()`` gives text)."""
    table = top_tokens_table(frame)
    probs = frame.pivot(index="layer", columns="rank", values="prob")
    probs.columns = table.columns

    alpha = 0.08 + 0.6 * probs.to_numpy(dtype=np.float64).clip(0, 1)
    css = pd.DataFrame(
        [[f"background-color: rgba(60, 110, 220, {a:.2f})" for a in row] for row in alpha],
        index=table.index,
        columns=table.columns,
    )
    caption = "Top-k next tokens per layer: token and probability"
    return table.style.apply(lambda _: css, axis=None).set_caption(caption)


# ---------------------------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------------------------

CELL_STATS = ("prob", "entropy", "kl")  # per-cell statistics every trajectory carries
TARGET_STATS = ("rank", "logprob", "prob", "logit")  # per target


@dataclass
class Trajectory:
    """Per-position, per-layer read-outs of one prompt under one lens.

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
        next_rank: ``[pos]`` its final rank (``-1`` at the last position); exact.
        vocab: decoded string of every token id that appears above.
        settings: model name, lens kind, k, L, precision, whether hooks were active.
        entropy: ``[pos, L]`` entropy of the lens' distribution (nats).
        kl_to_final: ``[pos, L]`` ``KL(p_final ‖ p_lens)`` (nats).
        target_labels: ``[n]`` a name per target (``" Rome"``, ``"next token"``...).
        target_ids: ``[pos, n]`` each target's id at each position (``-1``: none there).
        target_ranks: ``[pos, L, n]`` exact full-vocabulary rank (``-1`` where none).
        target_logprobs, target_logits: ``[pos, L, n]`` (NaN where none).
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
    entropy: Float[np.ndarray, "pos layer"] | None = field(default=None, repr=False)
    kl_to_final: Float[np.ndarray, "pos layer"] | None = field(default=None, repr=False)
    target_labels: list[str] = field(default_factory=list)
    target_ids: Int[np.ndarray, "pos n"] | None = field(default=None, repr=False)
    target_ranks: Int[np.ndarray, "pos layer n"] | None = field(default=None, repr=False)
    target_logprobs: Float[np.ndarray, "pos layer n"] | None = field(default=None, repr=False)
    target_logits: Float[np.ndarray, "pos layer n"] | None = field(default=None, repr=False)

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
    def targets(self) -> pd.DataFrame:
        """The chosen targets, tidy: one row per (position, layer, target) where the target is
        set, with ``pos, token, layer, target, target_id, target_token, rank, logprob, prob,
        logit`` (``token`` is the input token at ``pos``; ranks are exact and 1-based)."""
        columns = ["pos", "token", "layer", "target", "target_id", "target_token"]
        columns += ["rank", "logprob", "prob", "logit"]
        if not self.target_labels:
            return pd.DataFrame(columns=columns)
        n_pos, L, n = self.target_ranks.shape
        pos, layer, which = np.meshgrid(np.arange(n_pos), np.arange(L), np.arange(n), indexing="ij")
        ids = np.broadcast_to(self.target_ids[:, None, :], (n_pos, L, n))
        keep = (ids >= 0).ravel()
        logprob = self.target_logprobs.ravel()[keep].astype(np.float64)
        frame = pd.DataFrame(
            {
                "pos": pos.ravel()[keep],
                "token": np.asarray(self.tokens, dtype=object)[pos.ravel()[keep]],
                "layer": layer.ravel()[keep],
                "target": np.asarray(self.target_labels, dtype=object)[which.ravel()[keep]],
                "target_id": ids.ravel()[keep].astype(np.int64),
                "rank": self.target_ranks.ravel()[keep].astype(np.int64),
                "logprob": logprob,
                "prob": np.exp(logprob),
                "logit": self.target_logits.ravel()[keep].astype(np.float64),
            }
        )
        frame.insert(5, "target_token", self.token_strings(frame["target_id"]))
        return frame[columns]

    @property
    def stat_names(self) -> list[str]:
        """Names :meth:`stat` accepts: ``prob``, ``entropy``, ``kl`` and, per target label,
        ``rank``/``logprob``/``prob``/``logit`` as ``"rank: <label>"``."""
        names = ["prob"] + [s for s in CELL_STATS[1:] if self.entropy is not None]
        for label in self.target_labels:
            names += [f"{stat}: {label}" for stat in TARGET_STATS]
        return names

    def stat_name(self, name: str) -> str:
        """``name`` as listed in :attr:`stat_names`: with one target, ``"rank"``, ``"logprob"``
        and ``"logit"`` are its statistics (``"prob"`` is always the top-1 probability)."""
        if name in ("rank", "logprob", "logit") and len(self.target_labels) == 1:
            return f"{name}: {self.target_labels[0]}"
        if name not in self.stat_names:
            raise ValueError(f"unknown statistic {name!r}; choose from {self.stat_names}")
        return name

    def stat(self, name: str) -> Float[np.ndarray, "pos layer"]:
        """A per-cell statistic ``[pos, L]`` (see :attr:`stat_names`; NaN where undefined):
        ``prob`` = the top-1 token's probability, ``entropy``/``kl`` in nats; with one target,
        ``"rank"``, ``"logprob"`` and ``"logit"`` name its statistics."""
        name = self.stat_name(name)
        if name == "prob":
            return np.exp(self.top_logprobs[:, :, 0].astype(np.float64))
        if name == "entropy" and self.entropy is not None:
            return self.entropy.astype(np.float64)
        if name == "kl" and self.kl_to_final is not None:
            return self.kl_to_final.astype(np.float64)
        stat, _, label = name.partition(": ")
        if stat in TARGET_STATS and label in self.target_labels:
            c = self.target_labels.index(label)
            if stat == "rank":
                ranks = self.target_ranks[:, :, c].astype(np.float64)
                return np.where(ranks > 0, ranks, np.nan)
            values = (self.target_logits if stat == "logit" else self.target_logprobs)[:, :, c]
            values = values.astype(np.float64)
            return np.exp(values) if stat == "prob" else values
        raise ValueError(f"unknown statistic {name!r}; choose from {self.stat_names}")

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
        targets = f", targets={self.target_labels}" if self.target_labels else ""
        return (
            f"Trajectory({self.n_positions} tokens, model={s.get('model_name')!r}, "
            f"lens={self.lens_name!r}, k={self.k}, L={self.n_layers}{targets})"
        )

    def _repr_html_(self) -> str:
        return self.render()._repr_html_()


class TrajectoryBatch(Sequence):
    """Trajectories of several prompts under one lens (a sequence of :class:`Trajectory`).

    The tidy tables stack the prompts' with a first column ``prompt`` (the index); the view
    shows each prompt's heatmap, one below the other (:func:`beyond_top1.viz.batch_view`), and
    :meth:`diff` compares two of them (:func:`beyond_top1.viz.diff`).
    """

    def __init__(self, trajectories: Sequence[Trajectory]):
        self.trajectories = list(trajectories)

    def __getitem__(self, index):
        return self.trajectories[index]

    def __len__(self) -> int:
        return len(self.trajectories)

    def _stack(self, frames) -> pd.DataFrame:
        return pd.concat(
            [f.assign(prompt=i)[["prompt", *f.columns]] for i, f in enumerate(frames)],
            ignore_index=True,
        )

    @property
    def prompts(self) -> list[str]:
        return [t.prompt for t in self.trajectories]

    @property
    def targets(self) -> pd.DataFrame:
        """:attr:`Trajectory.targets` of every prompt, with a first column ``prompt``."""
        return self._stack([t.targets for t in self.trajectories])

    @property
    def saturation(self) -> pd.DataFrame:
        """:attr:`Trajectory.saturation` of every prompt, with a first column ``prompt``."""
        return self._stack([t.saturation for t in self.trajectories])

    def top_tokens(self, position: int = -1) -> pd.DataFrame:
        """:meth:`Trajectory.top_tokens` at ``position`` of every prompt, with ``prompt``."""
        return self._stack([t.top_tokens(position) for t in self.trajectories])

    def render(self, **kwargs):
        """Each prompt's heatmap, one below the other (:func:`beyond_top1.viz.batch_view`)."""
        from beyond_top1.viz import batch_view

        return batch_view(self, **kwargs)

    def diff(self, first: int = 0, second: int = 1, **kwargs):
        """:func:`beyond_top1.viz.diff` of two prompts of this batch."""
        from beyond_top1.viz import diff

        return diff(self.trajectories[first], self.trajectories[second], **kwargs)

    def __repr__(self) -> str:
        first = self.trajectories[0]
        return (
            f"TrajectoryBatch({len(self)} prompts, model={first.settings.get('model_name')!r}, "
            f"lens={first.lens_name!r}, k={first.k})"
        )

    def _repr_html_(self) -> str:
        return self.render()._repr_html_()


def _trajectories(model, prompts, lens, k, precision, targets, fwd_hooks) -> list[Trajectory]:
    L = hooked.n_layers(model)
    layers = tuple(range(L))
    token_lists = tokenize_prompts(model, prompts)
    resolved = [resolve_targets(model, targets, ids) for ids in token_lists]  # before the run
    labels = resolved[0][1]
    next_ids = [resolve_targets(model, NEXT, ids)[0] for ids in token_lists]
    resids = residuals_of_ids(model, token_lists, layers, fwd_hooks=fwd_hooks)
    runs = list(zip(token_lists, resids, strict=True))
    resid = torch.cat(resids)  # [all positions, L, d_model]
    lengths = [len(ids) for ids in token_lists]
    # The next token rides along as one more target: its final rank and log-prob.
    all_targets = np.concatenate(
        [np.concatenate([t, nxt], axis=1) for (t, _), nxt in zip(resolved, next_ids, strict=True)]
    )
    readout = lens_topk(lens, resid, layers, k, precision=precision)
    stats = cell_stats(lens, resid, layers, torch.from_numpy(all_targets))
    s = saturation_layers(readout.top_ids).cpu().numpy().astype(np.int64)
    top_ids = readout.top_ids.cpu().numpy().astype(np.int64)
    seen = [top_ids.ravel(), all_targets.ravel(), *[np.asarray(ids) for ids, _ in runs]]
    seen = np.unique(np.concatenate(seen).astype(np.int64))
    seen = seen[seen >= 0]
    vocab = dict(zip(seen.tolist(), hooked.token_strings(model, seen), strict=True))
    arrays = {
        "top_ids": top_ids,
        "top_logprobs": readout.top_logprobs.cpu().numpy().astype(np.float32),
        "final_ranks": readout.final_ranks.cpu().numpy().astype(np.int64),
        "s": s,
        "entropy": stats.entropy.cpu().numpy().astype(np.float32),
        "kl_to_final": stats.kl_to_final.cpu().numpy().astype(np.float32),
        "target_ranks": stats.target_ranks.cpu().numpy(),
        "target_logprobs": stats.target_logprobs.cpu().numpy(),
        "target_logits": stats.target_logits.cpu().numpy(),
    }
    settings = {
        "model_name": hooked.model_name(model),
        "lens": lens.kind,
        "k": k,
        "n_layers": L,
        "precision": precision,
        "hooked": bool(_as_hooks(fwd_hooks)),
        "d_vocab": hooked.d_vocab(model),
    }
    out = []
    offset = 0
    n = len(labels)
    for prompt, (ids, _), length, (target_ids, _) in zip(
        prompts, runs, lengths, resolved, strict=True
    ):
        rows = slice(offset, offset + length)
        offset += length
        part = {name: value[rows] for name, value in arrays.items()}
        next_rank = part["target_ranks"][:, -1, n]
        next_logprob = part["target_logprobs"][:, -1, n]
        out.append(
            Trajectory(
                prompt=prompt,
                token_ids=np.asarray(ids, dtype=np.int64),
                tokens=[vocab[i] for i in ids],
                top_ids=part["top_ids"],
                top_logprobs=part["top_logprobs"],
                final_ranks=part["final_ranks"],
                s=part["s"],
                next_logprob=next_logprob.astype(np.float32),
                next_rank=next_rank.astype(np.int64),
                vocab=vocab,
                settings=dict(settings),
                entropy=part["entropy"],
                kl_to_final=part["kl_to_final"],
                target_labels=list(labels),
                target_ids=target_ids,
                target_ranks=part["target_ranks"][:, :, :n],
                target_logprobs=part["target_logprobs"][:, :, :n],
                target_logits=part["target_logits"][:, :, :n],
            )
        )
    return out


def trajectory(
    model,
    prompt: str | Sequence[str],
    lens: Lens | None = None,
    k: int = 5,
    *,
    targets=None,
    precision: str = "fp32",
    fwd_hooks=(),
) -> Trajectory | TrajectoryBatch:
    """Top-k tokens, cell statistics and chosen targets at every position and layer.

    Args:
        model: a ``HookedTransformer`` or compatibility-mode ``TransformerBridge``.
        prompt: the text (at most the model's context; BOS is prepended if the model expects
            it), or a list of texts (a :class:`TrajectoryBatch` comes back).
        lens: a :class:`~beyond_top1.lenses.Lens` of ``model``, ``"logit"`` (the default) or
            a saved lens folder.
        k: ranks to track.
        targets: tokens to follow at every layer and position: a string that is one token
            (``" Rome"``), a token id, ``"next"`` (the actual next token), a list of these, or
            ids per position (an array ``[pos]`` or ``[pos, n]``, ``-1`` = none; one prompt).
            Their exact ranks, log-probs and logits are in :attr:`Trajectory.targets`.
        precision: ``"fp32"`` or ``"bf16"`` for the top-k (see :mod:`beyond_top1.ranking`).
        fwd_hooks: TransformerLens ``(hook name, function)`` pairs active during the run, e.g.
            a patch from :mod:`hooks`; with hooks, only prompts of equal token length share a
            batch, so a hook never sees padding.

    Returns:
        A :class:`Trajectory` for one prompt, a :class:`TrajectoryBatch` for a list; both
        render inline in Jupyter.
    """
    lens = resolve_lens(model, lens)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    prompts, single = _as_prompts(prompt)
    if not single and isinstance(targets, np.ndarray | Tensor):
        raise ValueError(
            "per-position target ids need one prompt; for a batch give strings, ids or 'next'"
        )
    vocab = hooked.d_vocab(model)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
    with torch.no_grad():
        out = _trajectories(model, prompts, lens, k, precision, targets, fwd_hooks)
    return out[0] if single else TrajectoryBatch(out)


__all__ = [
    "NEXT",
    "Trajectory",
    "TrajectoryBatch",
    "format_top_tokens",
    "prompt_residuals",
    "prompts_residuals",
    "residuals_of_ids",
    "resolve_targets",
    "single_token_id",
    "top_tokens",
    "tokenize_prompts",
    "top_tokens_table",
    "trajectory",
]
