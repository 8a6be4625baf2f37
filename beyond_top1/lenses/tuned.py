"""The tuned lens: per-layer affine translators trained to match the model's final distribution.

Each layer ``l < L-1`` gets a translator applied residually, ``h + h A_l + b_l`` (Belrose et al.
2023), trained to minimise ``KL(p_final ‖ p_lens)``. The public recipe (SGD with Nesterov momentum
from a zero init over hundreds of millions of tokens) is built for GPUs; on a CPU this module makes
training cheap three ways:

* **least-squares init**: translators start from the closed-form linear-shortcut solution
  (``A_l = W_l - I``), which is already far better than the logit lens;
* **token subsampling per layer**: every step runs the model over a fresh batch of texts, but
  each layer's translator is trained on a random subset of its tokens, so the expensive part
  (the ``d_model × vocab`` unembedding, forward and backward) is spent on diverse data;
* **bf16 unembedding** during training where the device multiplies bf16 natively (one bf16
  copy of ``W_U``, ~2-4× faster than fp32; fp32 elsewhere, where emulated bf16 is ~100× slower,
  so trained weights differ slightly between such machines), a fused KL with its analytic
  gradient (sums in fp32), and no gradient for the model's own parameters; the validation used
  for model selection is fp32.

A fixed held-out set is evaluated every ``eval_every`` steps and each layer keeps the translator
with its lowest held-out KL, so no layer ends worse than its initialisation on that set.
"""

from __future__ import annotations

import functools
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from beyond_top1 import distributed, hooked
from beyond_top1.activations import stream_residuals
from beyond_top1.data import text_list
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.io import register_lens_kind
from beyond_top1.lenses.linear import LinearShortcutLens
from beyond_top1.progress import tqdm
from beyond_top1.runtime import has_fast_bf16


@register_lens_kind
class TunedLens(Lens):
    """Affine translators ``h + h A_l + b_l`` for layers ``0..L-2``; the identity at ``L-1``."""

    kind = "tuned"

    def __init__(self, model, *, include_embedding: bool = False):
        super().__init__(model)
        self.include_embedding = include_embedding
        first = -1 if include_embedding else 0
        self.source_layers = tuple(range(first, self.n_layers - 1))
        n, d = len(self.source_layers), self.d_model
        self.weight = nn.Parameter(torch.zeros(n, d, d, device=hooked.model_device(model)))
        self.bias = nn.Parameter(torch.zeros(n, d, device=hooked.model_device(model)))
        self.training_settings: dict = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return (*self.source_layers, self.n_layers - 1)

    def transform(
        self, resid: Float[Tensor, "... d_model"], layer: int
    ) -> Float[Tensor, "... d_model"]:
        if layer == self.n_layers - 1:
            return resid
        i = self.source_layers.index(layer)
        return resid + resid @ self.weight[i].to(resid.dtype) + self.bias[i].to(resid.dtype)

    def config(self) -> dict:
        return {"include_embedding": self.include_embedding, "training": self.training_settings}

    @classmethod
    def from_config(cls, model, config: dict) -> TunedLens:
        lens = cls(model, include_embedding=bool(config.get("include_embedding", False)))
        lens.training_settings = dict(config.get("training", {}))
        return lens

    @classmethod
    def fit(
        cls,
        model,
        texts: Sequence[str],
        *,
        init: Lens | str = "linear",
        heldout_texts: Sequence[str] | None = None,
        settings: TunedLensTraining | None = None,
        progress: bool = True,
        **overrides,
    ) -> TunedLens:
        """Train a tuned lens on ``texts``: Adam on KL(p_final ‖ p_lens) per layer, keeping
        each layer's best held-out checkpoint.

        Args:
            texts: training texts, streamed in order, one batch per step (``max_steps`` batches
                at most; cycled in a seeded order if there are fewer).
            init: ``"linear"`` (a least-squares linear-shortcut lens with bias, fitted on the
                first ``n_init_texts`` texts), ``"zero"`` (the public recipe's init), or a
                fitted lens (fit it on texts other than the held-out ones).
            heldout_texts: texts for model selection (default: ``n_heldout_texts`` split off
                the end of ``texts``, never trained on).
            settings / overrides: see :class:`TunedLensTraining`.

        Returns:
            The lens in eval mode, with ``training_history`` (one row per evaluation and
            layer; saved with the lens) and ``training_settings``.
        """
        return _train(
            model,
            texts,
            init=init,
            heldout_texts=heldout_texts,
            settings=settings,
            progress=progress,
            **overrides,
        )

    @classmethod
    def from_lens(cls, model, lens: Lens) -> TunedLens:
        """Initialise from any lens whose ``transform`` is affine (e.g. a linear-shortcut lens).

        The affine map is read off ``lens.transform`` on the identity and zero inputs, so this
        works for any affine lens without knowing its parameterisation.
        """
        include_embedding = -1 in lens.layers
        tuned = cls(model, include_embedding=include_embedding)
        d = tuned.d_model
        device = hooked.model_device(model)
        eye = torch.eye(d, device=device)
        zero = torch.zeros(1, d, device=device)
        with torch.no_grad():
            for i, layer in enumerate(tuned.source_layers):
                offset = lens.transform(zero, layer)[0]
                tuned.weight[i] = lens.transform(eye, layer) - offset - eye
                tuned.bias[i] = offset
        return tuned


@dataclass
class TunedLensTraining:
    """Settings of :meth:`TunedLens.fit` (stored in the saved lens' config).

    ``time_limit_s`` counts the whole call (init included): training stops before a step that
    would overrun it, going by the durations of the steps and evaluations so far (the init and
    the first step always run). ``clock``
    says what is timed: ``"wall"`` seconds, or ``"cpu"``, this process' CPU seconds divided by
    torch's thread count, i.e. the wall time of the same work on an otherwise idle machine
    (for measuring on a shared machine).
    """

    init: str = "linear"
    max_steps: int = 60
    batch_size: int = 8
    max_len: int = 128
    tokens_per_layer: int = 256
    lr: float = 4e-3  # Adam step for a residual of RMS 1; layer l uses lr / rms_l
    weight_decay: float = 0.0
    n_init_texts: int = 200
    n_heldout_texts: int = 8
    eval_every: int = 20
    time_limit_s: float | None = None
    clock: str = "wall"
    layers: list[int] | None = None  # translators to train (default all; the rest keep init)
    seed: int = 0
    score_first: bool = False  # train on position 0 of a model without BOS (beyond_top1.data)


class _Clock:
    """Seconds since creation: wall-clock, or process CPU time per torch thread."""

    def __init__(self, kind: str):
        if kind not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {kind!r}")
        self.kind = kind
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def __call__(self) -> float:
        return self.wall() if self.kind == "wall" else self.cpu() / torch.get_num_threads()


def _kl(log_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean ``KL(p ‖ q)`` in nats over rows; ``log_p`` fp32, ``logits_q`` any dtype."""
    log_q = logits_q.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class _Target:
    """The final distribution of a batch, with what the fused KL needs per row."""

    def __init__(self, log_p: Float[Tensor, "tokens vocab"]):
        self.p = log_p.exp()
        self.mass = self.p.sum(-1)  # 1 up to rounding; kept so the KL is exact
        self.neg_entropy = torch.linalg.vecdot(self.p, log_p)


class _FusedKL(torch.autograd.Function):
    """Mean ``KL(p ‖ softmax(z))`` over rows with the analytic gradient ``(q·Σp - p) / n``.

    ``KL = Σp log p - Σp z + Σp · logsumexp(z)``: a few passes over ``[tokens, vocab]`` instead
    of autograd's log-softmax graph; ``z`` may be bf16, the sums are fp32.
    """

    @staticmethod
    def forward(ctx, logits, p, mass, neg_entropy):
        z = logits.float()
        lse = z.logsumexp(-1)
        kl = neg_entropy - torch.linalg.vecdot(p, z) + mass * lse
        ctx.save_for_backward(z, lse, p, mass)
        ctx.logits_dtype = logits.dtype
        return kl.mean()

    @staticmethod
    def backward(ctx, grad):
        z, lse, p, mass = ctx.saved_tensors
        q = (z - lse[:, None]).exp_().mul_(mass[:, None])
        dz = q.sub_(p).mul_(grad / z.shape[0])
        return dz.to(ctx.logits_dtype), None, None, None


class _Unembed(torch.autograd.Function):
    """``x @ W_U`` whose backward multiplies by a contiguous copy of ``W_U.T``.

    Autograd's backward would use the transposed view, and with torch 2.13's CPU bf16 GEMM a
    ``[32, vocab] @ W_U.T``-view product dies with a floating-point exception (SIGFPE; other
    row counts and the contiguous layout are fine). ``W_U`` gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, w_u, w_u_t):
        ctx.save_for_backward(w_u_t)
        return x @ w_u

    @staticmethod
    def backward(ctx, grad):
        (w_u_t,) = ctx.saved_tensors
        return grad @ w_u_t, None, None


def _heldout_kl(lens: TunedLens, layers, heldout: list[tuple[Tensor, Tensor]]) -> Tensor:
    """KL per layer of ``layers`` on the held-out residuals (columns in that order), fp32."""
    totals = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for resid, log_p in heldout:
            for i, layer in enumerate(layers):
                kl = _kl(log_p, lens(resid[:, i], layer))
                totals[i] += float(kl) * resid.shape[0]  # (kl may be on another device)
            count += resid.shape[0]
    return totals / count


def _residual_rms(heldout: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Median residual RMS per layer (column) on the held-out tokens."""
    resid = torch.cat([r for r, _ in heldout])
    return resid.float().pow(2).mean(-1).sqrt().median(0).values.clamp_min(1e-6)


def _collect_heldout(model, lens, layers, texts, settings) -> list[tuple[Tensor, Tensor]]:
    L = lens.n_layers
    out = []
    for batch in stream_residuals(
        model,
        texts,
        layers=(*layers, L - 1),
        batch_size=settings.batch_size,
        max_len=settings.max_len,
        progress=False,
        score_first=settings.score_first,
    ):
        with torch.no_grad():
            log_p = lens(batch.at(L - 1), L - 1).float().log_softmax(-1)
        out.append((batch.resid[:, :-1].clone(), log_p))
    return out


def _train(
    model,
    texts: Sequence[str],
    *,
    init: Lens | str = "linear",
    heldout_texts: Sequence[str] | None = None,
    settings: TunedLensTraining | None = None,
    progress: bool = True,
    **overrides,
) -> TunedLens:
    """Train a :class:`TunedLens` on ``texts`` (see :meth:`TunedLens.fit`).

    Args:
        texts: training texts, streamed in order, one batch per step (``max_steps`` batches at
            most; the texts are cycled in a seeded order if there are fewer).
        init: ``"linear"`` (fit a least-squares linear-shortcut lens with bias on the first
            ``n_init_texts`` texts), ``"zero"`` (the public recipe's init), or a fitted lens
            (fit it on texts other than the held-out ones, or model selection starts from an
            optimistic held-out KL).
        heldout_texts: texts for model selection (default: ``n_heldout_texts`` split off the end
            of ``texts``, never trained on).
        settings / overrides: see :class:`TunedLensTraining`.

    Returns:
        The lens in eval mode; ``lens.training_history`` has one row per evaluation and layer:
        ``step, tokens, seconds, wall_seconds, cpu_seconds, layer, heldout_kl`` (``seconds`` on
        the ``clock`` of the settings, init included).
    """
    settings = settings or TunedLensTraining()
    settings = TunedLensTraining(**{**asdict(settings), **overrides})
    _check_ranks(settings, distributed.ranks())  # before the linear init and held-out pass
    clock = _Clock(settings.clock)
    texts = text_list(texts)
    if heldout_texts is None:
        if len(texts) <= settings.n_heldout_texts:
            raise ValueError(
                f"need more than {settings.n_heldout_texts} texts to hold some out; "
                f"got {len(texts)}"
            )
        heldout_texts = texts[-settings.n_heldout_texts :]
        texts = texts[: -settings.n_heldout_texts]
    if not texts:
        raise ValueError("no training texts")
    layers = _trained_layers(model, init, settings.layers)
    with hooked.frozen(model):
        lens = _initial_lens(model, texts, init, settings, progress)
        heldout = _collect_heldout(model, lens, layers, heldout_texts, settings)
        history, steps, tokens, best_kl = _optimise(
            model, lens, layers, texts, heldout, settings, clock, progress
        )
    lens.training_settings = {
        **asdict(settings),
        "steps": steps,
        "tokens": tokens,
        "seconds": round(clock.wall(), 1),
        "cpu_seconds": round(clock.cpu(), 1),
        "threads": torch.get_num_threads(),
        "trained_layers": list(layers),
        "heldout_kl": [round(float(x), 5) for x in best_kl],
    }
    if distributed.ranks().active:  # recorded only then: one-process settings stay as they were
        lens.training_settings["ranks"] = distributed.ranks().world_size
    lens.requires_grad_(False)
    lens.training_history = pd.concat(history, ignore_index=True)  # saved with the lens
    return lens.eval()


def train_tuned_lens(model, texts: Sequence[str], **kwargs) -> tuple[TunedLens, pd.DataFrame]:
    """Deprecated: ``lens = TunedLens.fit(model, texts, ...)``; the history is
    ``lens.training_history``."""
    warnings.warn(
        "train_tuned_lens(...) is now TunedLens.fit(...) (the history is "
        "lens.training_history); the old name goes away in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    lens = TunedLens.fit(model, texts, **kwargs)
    return lens, lens.training_history


def _trained_layers(model, init, layers) -> tuple[int, ...]:
    """The source layers to train, checked before anything expensive runs."""
    first = -1 if isinstance(init, Lens) and -1 in init.layers else 0
    sources = tuple(range(first, hooked.n_layers(model) - 1))
    if layers is None:
        return sources
    layers = tuple(sorted({int(l) for l in layers}))
    if not layers or any(l not in sources for l in layers):
        raise ValueError(
            f"layers must be a non-empty subset of the translated layers {sources}; "
            f"got {list(layers)}"
        )
    return layers


def _check_ranks(settings: TunedLensTraining, where: distributed.Ranks) -> None:
    """Under ``torchrun`` each step's batch is split across ranks, so every rank must take
    the same number of steps: a time limit (different on each rank) cannot stop them."""
    if not where.active:
        return
    if settings.batch_size % where.world_size:
        raise ValueError(
            f"batch_size {settings.batch_size} must be a multiple of the {where.world_size} "
            "ranks (each step's texts are split evenly across them)"
        )
    if settings.time_limit_s is not None:
        raise ValueError("time_limit_s does not work under torchrun: give max_steps instead")


def _all_reduce_mean(parameters: list[nn.Parameter], n_rows: int, n_tokens: int, where) -> int:
    """Average the gradients over ranks, weighted by each rank's rows (one all-reduce, what
    DDP does), so every rank takes the same optimizer step, the translators stay identical,
    and the step is the one process's whenever every row of the batch is used. Returns the
    step's tokens over all ranks."""
    if not where.active:
        return n_tokens
    grads = [p.grad for p in parameters]
    counts = grads[0].new_tensor([n_rows, n_tokens])
    flat = torch.cat([*(g.reshape(-1) * n_rows for g in grads), counts])
    distributed.all_reduce_sum(flat, where)
    rows, tokens = float(flat[-2]), int(round(float(flat[-1])))
    flat = flat[:-2] / rows
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))
    return tokens


def _optimise(model, lens, layers, texts, heldout, settings, clock, progress):
    """The training loop; leaves the best translator per trained layer in ``lens``.

    Under ``torchrun`` rank ``r`` takes part ``r`` of each step's batch (the same global batch
    and steps as one process) and the gradients are averaged over ranks before each step.
    """
    where = distributed.ranks()
    generator = torch.Generator().manual_seed(settings.seed + where.rank)
    order = list(range(len(texts)))
    random.Random(settings.seed).shuffle(order)
    n_texts = settings.max_steps * settings.batch_size
    stream_texts = [texts[order[i % len(order)]] for i in range(n_texts)]

    # One parameter pair per layer, so each layer gets its own step size: ``lr / rms_l``, where
    # rms_l is the typical residual norm at layer l (it grows ~20x through SmolLM2's depth).
    index = [lens.source_layers.index(l) for l in layers]
    weights = [nn.Parameter(lens.weight[i].detach().clone()) for i in index]
    biases = [nn.Parameter(lens.bias[i].detach().clone()) for i in index]
    scales = _residual_rms(heldout)
    optimizer = torch.optim.Adam(
        [
            {"params": [w, b], "lr": settings.lr / float(s)}
            for w, b, s in zip(weights, biases, scales, strict=True)
        ],
        weight_decay=settings.weight_decay,
    )
    # The unembedding in bf16 where the device multiplies bf16 natively (~2-4x faster than
    # fp32; emulated bf16 is ~100x slower, so fp32 elsewhere), cast once; loss sums in fp32.
    W_U, b_U = hooked.unembedding_weights(model)
    if has_fast_bf16(W_U.device):
        W_U, b_U = W_U.to(torch.bfloat16), b_U.to(torch.bfloat16)
    W_U_T = W_U.T.contiguous()  # for the backward pass (see _Unembed)
    L = lens.n_layers
    eval_start = clock()
    best_kl = _heldout_kl(lens, layers, heldout)
    eval_seconds = clock() - eval_start
    best_state = {k: v.detach().clone() for k, v in lens.state_dict().items()}
    history = [_history_rows(0, 0, clock, layers, best_kl)]
    tokens_seen, step, step_seconds = 0, 0, 0.0
    limit = settings.time_limit_s
    progress = progress and where.is_main
    bar = tqdm(total=settings.max_steps, desc="tuned lens", unit="step", disable=not progress)
    batches = stream_residuals(
        model,
        stream_texts,
        layers=(*layers, L - 1),
        batch_size=settings.batch_size // where.world_size,
        max_len=settings.max_len,
        progress=False,
        score_first=settings.score_first,
        select=where.owns if where.active else None,
    )
    tokens_per_layer = -(-settings.tokens_per_layer // where.world_size)
    evaluate = functools.partial(
        _evaluate, lens, layers, index, weights, biases, heldout, best_kl, best_state, clock
    )
    evaluated = True
    step_start = clock()
    for batch in batches:  # (the forward pass of the batch is part of its step's time)
        if limit is not None and clock() + step_seconds + eval_seconds > limit:
            break  # this step and an evaluation would overrun the time limit
        step += 1
        with torch.no_grad():
            target = _Target(lens(batch.at(L - 1), L - 1).float().log_softmax(-1))
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        n = min(tokens_per_layer, len(batch))
        for i in range(len(layers)):
            rows = torch.randperm(len(batch), generator=generator)[:n].to(target.p.device)
            h = batch.resid[rows, i]
            normed = hooked.final_norm(model, h + h @ weights[i] + biases[i])
            logits = _Unembed.apply(normed.to(W_U.dtype), W_U, W_U_T) + b_U
            loss = _FusedKL.apply(
                logits, target.p[rows], target.mass[rows], target.neg_entropy[rows]
            )
            loss.backward()
            total += loss.item()
        tokens_seen += _all_reduce_mean([*weights, *biases], n, len(batch), where)
        optimizer.step()
        bar.update(1)
        bar.set_postfix(train_kl=f"{total / len(layers):.3f}")
        step_seconds = max(step_seconds, clock() - step_start)
        step_start = clock()
        evaluated = step % settings.eval_every == 0 or step == settings.max_steps
        if evaluated:
            kl, eval_seconds = evaluate()
            history.append(_history_rows(step, tokens_seen, clock, layers, kl))
            step_start = clock()
    batches.close()
    if not evaluated:  # stopped by the time limit between evaluations
        kl, _ = evaluate()
        history.append(_history_rows(step, tokens_seen, clock, layers, kl))
    bar.close()
    lens.load_state_dict(best_state)
    return history, step, tokens_seen, best_kl


def _evaluate(
    lens, layers, index, weights, biases, heldout, best_kl, best_state, clock
) -> tuple[Tensor, float]:
    """Copy the trained translators into ``lens``, score them and keep the best per layer.

    Returns the held-out KL per layer and the seconds it took.
    """
    start = clock()
    with torch.no_grad():
        lens.weight[index] = torch.stack(weights)
        lens.bias[index] = torch.stack(biases)
    kl = _heldout_kl(lens, layers, heldout)
    _keep_best_per_layer(lens, index, kl, best_kl, best_state)
    return kl, clock() - start


def _initial_lens(model, texts, init, settings: TunedLensTraining, progress: bool) -> TunedLens:
    if isinstance(init, Lens):
        tuned = TunedLens.from_lens(model, init)
    elif init == "zero":
        tuned = TunedLens(model)
    elif init == "linear":
        linear = LinearShortcutLens.fit(
            model,
            texts[: settings.n_init_texts],
            bias=True,
            batch_size=settings.batch_size,
            max_len=settings.max_len,
            progress=progress,
            score_first=settings.score_first,
        )
        tuned = TunedLens.from_lens(model, linear)
    else:
        raise ValueError(f"init must be 'linear', 'zero' or a Lens, got {init!r}")
    return tuned.requires_grad_(False)


def _keep_best_per_layer(lens: TunedLens, index, kl: Tensor, best_kl: Tensor, best_state) -> None:
    """Per-layer checkpoint selection on held-out KL (updates ``best_kl``/``best_state``).

    ``kl[j]`` and ``best_kl[j]`` belong to the translator ``index[j]`` of the lens.
    """
    with torch.no_grad():
        for j, i in enumerate(index):
            if math.isfinite(float(kl[j])) and kl[j] < best_kl[j]:
                best_kl[j] = kl[j]
                best_state["weight"][i] = lens.weight[i].detach()
                best_state["bias"][i] = lens.bias[i].detach()


def _history_rows(step, tokens, clock: _Clock, layers, kl: Tensor) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": step,
            "tokens": tokens,
            "seconds": round(clock(), 2),
            "wall_seconds": round(clock.wall(), 2),
            "cpu_seconds": round(clock.cpu(), 2),
            "layer": list(layers),
            "heldout_kl": kl.tolist(),
        }
    )


__all__ = ["TunedLens", "TunedLensTraining", "train_tuned_lens"]
