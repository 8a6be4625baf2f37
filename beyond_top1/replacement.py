"""Linear replacement of single sub-modules (004 §6, "Linear shortcut across sub-modules").

For every block ``l`` and sub-module kind (attention, MLP, normalisation), fit a least-squares
affine map from the sub-module's input to its output over many tokens
(:meth:`SubmoduleMaps.fit`, one streamed pass for all layers and kinds), then run the model with
that one sub-module replaced by the map and score the change of the final distribution
(:func:`evaluate_replacements`): Precision@1 of the replaced model's top-1 against the
unmodified model's top-1 and ``KL(p_orig ‖ p_replaced)``, against baselines that drop the
sub-module's output (``zero``), pass its input through (``identity``) or output its mean over the
fitting tokens (``mean``).

The input/output hook names per kind are in :mod:`hooks.replace`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from beyond_top1 import distributed, hooked
from beyond_top1.data import DEFAULT_MAX_LEN, DEFAULT_SCORE_FIRST, iter_token_batches
from beyond_top1.hooks.replace import FwdHooks, linear_replacement_hooks, replace_with_constant
from beyond_top1.lenses.least_squares import DEFAULT_RIDGE, LeastSquaresAccumulator
from beyond_top1.lenses.metrics import Moments, coordinate_r2, squared_error
from beyond_top1.progress import tqdm

DEFAULT_KINDS = ("attn", "mlp", "norm")
VARIANTS = ("fit", "zero", "identity", "mean")
DEFAULT_VARIANTS = ("fit", "zero", "identity")


@dataclass
class SubmoduleMaps:
    """Fitted maps ``output ≈ input @ weight[kind][i] + bias[kind][i]`` for ``layers[i]`` (float64).

    ``mean_output[kind][i]`` is the sub-module's mean output over the fitting tokens (the
    ``mean`` baseline).
    """

    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    weight: dict[str, Float[Tensor, "layer d_in d_out"]]
    bias: dict[str, Float[Tensor, "layer d_out"]]
    mean_output: dict[str, Float[Tensor, "layer d_out"]]
    n_tokens: int
    settings: dict = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        model,
        texts: Iterable[str],
        *,
        layers: Sequence[int] | None = None,
        kinds: Sequence[str] = DEFAULT_KINDS,
        bias: bool = True,
        ridge: float = DEFAULT_RIDGE,
        batch_size: int = 8,
        max_len: int | None = None,
        progress: bool = True,
        score_first: bool = DEFAULT_SCORE_FIRST,
    ) -> SubmoduleMaps:
        """Fit input -> output least-squares maps of every ``(layer, kind)`` in one pass over
        ``texts`` (every scored token is a row; see :mod:`beyond_top1.data`). ``ridge`` is
        relative (see :mod:`beyond_top1.lenses.least_squares`); ``bias`` fits an offset (not
        penalised). Memory: two float64 ``[layers, d+1, d]`` matrices per kind."""
        layers, kinds = _resolve(model, layers, kinds)
        d = hooked.d_model(model)
        device = hooked.model_device(model)
        names = {k: [hooked.submodule_hook_names(l, k) for l in layers] for k in kinds}
        wanted = sorted({n for pairs in names.values() for pair in pairs for n in pair})
        accumulators = {
            k: LeastSquaresAccumulator(d, d, bias=bias, n_maps=len(layers), device=device)
            for k in kinds
        }
        sums = {k: torch.zeros(len(layers), d, dtype=torch.float64, device=device) for k in kinds}
        start = time.perf_counter()
        where = distributed.ranks()  # under torchrun: batch b on rank b mod N, then all-reduce
        total = len(texts) if hasattr(texts, "__len__") else None
        progress = progress and where.is_main
        bar = tqdm(total=total, unit="text", desc="fit", disable=not progress, leave=False)
        batches = iter_token_batches(
            model, texts, batch_size=batch_size, max_len=max_len, score_first=score_first
        )

        def accumulate() -> None:
            for index, batch in enumerate(batches):
                bar.update(len(batch.text_ids))
                if not where.owns(index):
                    continue
                _, acts = hooked.run_with_activations(model, batch.tokens.to(device), wanted)
                rows, cols = batch.scored.to(device).nonzero(as_tuple=True)
                for kind in kinds:
                    x = torch.stack([acts[src][rows, cols] for src, _ in names[kind]], dim=1)
                    y = torch.stack([acts[tgt][rows, cols] for _, tgt in names[kind]], dim=1)
                    accumulators[kind].update(x, y)
                    sums[kind] += y.sum(0, dtype=torch.float64)
                del acts

        distributed.run_checked(accumulate, where)
        bar.close()
        for kind in kinds:
            accumulators[kind].all_reduce(where)
            distributed.all_reduce_sum(sums[kind], where)
        n_tokens = accumulators[kinds[0]].n_tokens
        if n_tokens == 0:
            raise ValueError("the texts have no scored tokens to fit on")
        weight, offset, mean = {}, {}, {}
        for kind in kinds:
            w, b = accumulators[kind].solve(ridge)
            weight[kind] = w
            offset[kind] = b if b is not None else torch.zeros_like(sums[kind])
            mean[kind] = sums[kind] / n_tokens
        settings = {
            "ridge": ridge,
            "bias": bias,
            "n_tokens": n_tokens,
            "max_len": max_len or min(DEFAULT_MAX_LEN, hooked.n_ctx(model)),
            "score_first": bool(score_first),
            "seconds": round(time.perf_counter() - start, 2),
        }
        return cls(layers, kinds, weight, offset, mean, n_tokens, settings)

    def hooks(self, layer: int, kind: str, variant: str = "fit") -> FwdHooks:
        """``fwd_hooks`` replacing sub-module ``kind`` of block ``layer`` by ``variant``."""
        if kind not in self.kinds:
            raise ValueError(f"no maps for kind {kind!r}; fitted kinds: {self.kinds}")
        if layer not in self.layers:
            raise ValueError(f"no maps for layer {layer}; fitted layers: {self.layers}")
        i = self.layers.index(layer)
        source, target = hooked.submodule_hook_names(layer, kind)
        if variant == "fit":
            return linear_replacement_hooks(
                source, target, self.weight[kind][i], self.bias[kind][i]
            )
        if variant == "identity":
            return linear_replacement_hooks(source, target)
        if variant == "zero":
            return [(target, replace_with_constant(0.0))]
        if variant == "mean":
            return [(target, replace_with_constant(self.mean_output[kind][i]))]
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _resolve(model, layers, kinds) -> tuple[tuple[int, ...], tuple[str, ...]]:
    L = hooked.n_layers(model)
    layers = tuple(range(L)) if layers is None else tuple(int(l) for l in layers)
    if not layers or any(not 0 <= l < L for l in layers):
        raise ValueError(f"layers must be a non-empty subset of 0..{L - 1}, got {layers}")
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in hooked.SUBMODULE_KINDS:
            raise ValueError(f"kind must be one of {hooked.SUBMODULE_KINDS}, got {kind!r}")
    hooked.check_submodule_layout(model, kinds)
    return layers, kinds


class _Sums:
    """Float64 running sums of one (layer, kind, variant) cell."""

    __slots__ = ("agree", "ce", "kl", "kl_sq", "n", "n_ce", "ss_res")

    def __init__(self):
        self.agree = self.kl = self.kl_sq = self.ce = 0.0
        self.ss_res: Tensor | float = 0.0
        self.n = self.n_ce = 0


class _Reference:
    """The unmodified model's distribution at the scored positions of one batch."""

    def __init__(self, logits: Float[Tensor, "n vocab"], next_ids: Int[Tensor, " n"]):
        self.log_probs = logits.float().log_softmax(-1)
        self.probs = self.log_probs.exp()
        self.top1 = self.log_probs.argmax(-1)
        self.next_ids = next_ids
        self.has_next = next_ids >= 0

    def cross_entropy(self, log_probs: Float[Tensor, "n vocab"]) -> float:
        """Summed ``-log p(next token)`` over positions that have a next token."""
        picked = log_probs[self.has_next].gather(-1, self.next_ids[self.has_next, None])
        return -float(picked.double().sum())

    def score(self, logits: Float[Tensor, "n vocab"], sums: _Sums) -> None:
        log_probs = logits.float().log_softmax(-1)
        kl = torch.linalg.vecdot(self.probs, self.log_probs - log_probs).double().clamp_min(0)
        sums.agree += float((log_probs.argmax(-1) == self.top1).sum())
        sums.kl += float(kl.sum())
        sums.kl_sq += float(kl.pow(2).sum())
        sums.n += int(logits.shape[0])
        sums.ce += self.cross_entropy(log_probs)
        sums.n_ce += int(self.has_next.sum())


def fit_submodule_maps(model, texts: Iterable[str], **kwargs) -> SubmoduleMaps:
    """Deprecated: ``SubmoduleMaps.fit(model, texts, ...)``."""
    warnings.warn(
        "fit_submodule_maps(...) is now SubmoduleMaps.fit(...); the old name goes away in the "
        "next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return SubmoduleMaps.fit(model, texts, **kwargs)


def evaluate_replacements(
    model,
    maps: SubmoduleMaps,
    texts: Iterable[str],
    *,
    layers: Sequence[int] | None = None,
    kinds: Sequence[str] | None = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    batch_size: int = 8,
    max_len: int | None = None,
    progress: bool = True,
    score_first: bool = DEFAULT_SCORE_FIRST,
) -> pd.DataFrame:
    """Run the model once per ``(layer, kind, variant)`` with that one sub-module replaced.

    Each replaced run starts from the clean ``hook_resid_pre`` of the replaced block (the blocks
    before it are unchanged), so it costs ``L - l`` blocks. Positions are the scored tokens of
    ``texts`` (no padding, not position 0 unless ``score_first``).

    Returns one row per ``(layer, kind, variant)``: ``n_tokens``, ``precision_at_1`` (replaced
    top-1 == unmodified top-1), ``kl`` = mean ``KL(p_orig ‖ p_replaced)`` in nats with its
    standard error ``kl_se``, ``cross_entropy`` against the next token (``ce_orig``: the
    unmodified model's), and ``r2``: coordinate-averaged r² of the replacement's output against
    the sub-module's true output on these tokens, given clean inputs.
    """
    layers = maps.layers if layers is None else tuple(layers)
    kinds = maps.kinds if kinds is None else tuple(kinds)
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    for layer in layers:
        if layer not in maps.layers:
            raise ValueError(f"layer {layer} was not fitted; fitted: {maps.layers}")
    for kind in kinds:
        if kind not in maps.kinds:
            raise ValueError(f"kind {kind!r} was not fitted; fitted: {maps.kinds}")
    device = hooked.model_device(model)
    cells = {(l, k, v): _Sums() for l in layers for k in kinds for v in variants}
    moments = {(l, k): Moments() for l in layers for k in kinds}
    orig_ce, orig_n = 0.0, 0
    names = [hooked.resid_pre_hook_name(l) for l in layers]
    names += [n for l in layers for k in kinds for n in hooked.submodule_hook_names(l, k)]
    names = list(dict.fromkeys(names))
    total = len(texts) if hasattr(texts, "__len__") else None
    bar = tqdm(total=total, unit="text", desc="replace", disable=not progress, leave=False)
    batches = iter_token_batches(
        model, texts, batch_size=batch_size, max_len=max_len, score_first=score_first
    )
    for batch in batches:
        bar.update(len(batch.text_ids))
        tokens = batch.tokens.to(device)
        logits, acts = hooked.run_with_activations(model, tokens, names, return_logits=True)
        rows, cols = batch.scored.to(device).nonzero(as_tuple=True)
        reference = _Reference(logits[rows, cols], batch.next_tokens.to(device)[rows, cols])
        orig_ce += reference.cross_entropy(reference.log_probs)
        orig_n += int(reference.has_next.sum())
        del logits
        layer_bar = tqdm(layers, unit="layer", desc="layers", disable=not progress, leave=False)
        for layer in layer_bar:
            start = acts[hooked.resid_pre_hook_name(layer)]
            for kind in kinds:
                source, target = hooked.submodule_hook_names(layer, kind)
                x, y = acts[source][rows, cols], acts[target][rows, cols]
                moments[layer, kind].update(y)
                for variant in variants:
                    cell = cells[layer, kind, variant]
                    pred = _predict(maps, layer, kind, variant, x)
                    cell.ss_res = cell.ss_res + squared_error(pred, y)
                    hooks = maps.hooks(layer, kind, variant)
                    out = hooked.run_from_layer(model, start, layer, hooks)
                    reference.score(out[rows, cols], cell)
                    del out
        del acts
    bar.close()
    records = []
    for (layer, kind, variant), sums in cells.items():
        n = max(sums.n, 1)
        kl_mean = sums.kl / n
        kl_var = max(sums.kl_sq / n - kl_mean**2, 0.0)
        ss_tot = moments[layer, kind].ss_tot
        records.append(
            {
                "layer": layer,
                "kind": kind,
                "variant": variant,
                "n_tokens": sums.n,
                "precision_at_1": sums.agree / n,
                "kl": kl_mean,
                "kl_se": math.sqrt(kl_var / n) if sums.n > 1 else math.nan,
                "cross_entropy": sums.ce / max(sums.n_ce, 1),
                "ce_orig": orig_ce / max(orig_n, 1),
                "r2": coordinate_r2(sums.ss_res, ss_tot) if ss_tot is not None else math.nan,
            }
        )
    return pd.DataFrame(records)


def _predict(maps: SubmoduleMaps, layer: int, kind: str, variant: str, x: Tensor) -> Tensor:
    """The replacement's output for clean inputs ``x`` (for r²)."""
    i = maps.layers.index(layer)
    if variant == "fit":
        return x.double() @ maps.weight[kind][i].to(x.device) + maps.bias[kind][i].to(x.device)
    if variant == "identity":
        return x
    if variant == "zero":
        return torch.zeros_like(x)
    return maps.mean_output[kind][i].to(x.device).expand_as(x)


def replacement_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean over layers of Precision@1 and KL per ``kind × variant`` (rows ``kind``)."""
    table = frame.groupby(["kind", "variant"], sort=False)[["precision_at_1", "kl"]].mean()
    return table.unstack("variant")


__all__ = [
    "DEFAULT_KINDS",
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "SubmoduleMaps",
    "evaluate_replacements",
    "fit_submodule_maps",
    "replacement_summary",
]
