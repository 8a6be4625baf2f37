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
* **bf16 unembedding** during training (autocast; ~2-4× faster than fp32 on this CPU), with the
  loss, softmax and the validation used for model selection in fp32.

A fixed held-out set is evaluated every ``eval_every`` steps and each layer keeps the translator
with its lowest held-out KL, so no layer ends worse than its initialisation on that set.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from beyond_top1 import hooked
from beyond_top1.activations import stream_residuals
from beyond_top1.lenses.base import Lens
from beyond_top1.lenses.io import register_lens_kind


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
    """Settings of :func:`train_tuned_lens` (stored in the saved lens' config)."""

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
    seed: int = 0


def _kl(log_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean ``KL(p ‖ q)`` in nats over rows; ``log_p`` fp32, ``logits_q`` any dtype."""
    log_q = logits_q.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def _heldout_kl(lens: TunedLens, heldout: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Per-source-layer KL on the held-out residuals, fp32."""
    totals = torch.zeros(len(lens.source_layers), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for resid, log_p in heldout:
            for i, layer in enumerate(lens.source_layers):
                kl = _kl(log_p, lens(resid[:, i], layer))
                totals[i] += kl.double() * resid.shape[0]
            count += resid.shape[0]
    return totals / count


def _residual_rms(heldout: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Median residual RMS per source layer on the held-out tokens."""
    resid = torch.cat([r for r, _ in heldout])
    return resid.float().pow(2).mean(-1).sqrt().median(0).values.clamp_min(1e-6)


def _collect_heldout(model, lens, texts, settings) -> list[tuple[Tensor, Tensor]]:
    L = lens.n_layers
    layers = (*lens.source_layers, L - 1)
    out = []
    for batch in stream_residuals(
        model,
        texts,
        layers=layers,
        batch_size=settings.batch_size,
        max_len=settings.max_len,
        progress=False,
    ):
        with torch.no_grad():
            log_p = lens(batch.at(L - 1), L - 1).float().log_softmax(-1)
        out.append((batch.resid[:, :-1].clone(), log_p))
    return out


def train_tuned_lens(
    model,
    texts: Sequence[str],
    *,
    init: Lens | str = "linear",
    heldout_texts: Sequence[str] | None = None,
    settings: TunedLensTraining | None = None,
    progress: bool = True,
    **overrides,
) -> tuple[TunedLens, pd.DataFrame]:
    """Train a :class:`TunedLens` on ``texts`` and return it with its training history.

    Args:
        texts: training texts, streamed in order, one batch per step (``max_steps`` batches at
            most; the texts are cycled in a seeded order if there are fewer).
        init: ``"linear"`` (fit a least-squares linear-shortcut lens with bias on the first
            ``n_init_texts`` texts), ``"zero"`` (the public recipe's init), or a fitted lens.
        heldout_texts: texts for model selection (default: ``n_heldout_texts`` split off the end
            of ``texts``, never trained on).
        settings / overrides: see :class:`TunedLensTraining`.

    Returns:
        The lens (in eval mode) and a DataFrame with one row per evaluation: ``step, tokens,
        seconds, layer, heldout_kl``.
    """
    settings = settings or TunedLensTraining()
    settings = TunedLensTraining(**{**asdict(settings), **overrides})
    texts = list(texts)
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
    start = time.perf_counter()
    lens = _initial_lens(model, texts, init, settings, progress)
    heldout = _collect_heldout(model, lens, heldout_texts, settings)

    generator = torch.Generator().manual_seed(settings.seed)
    order = list(range(len(texts)))
    random.Random(settings.seed).shuffle(order)
    n_texts = settings.max_steps * settings.batch_size
    stream_texts = [texts[order[i % len(order)]] for i in range(n_texts)]

    # One parameter pair per layer, so each layer gets its own step size: ``lr / rms_l``, where
    # rms_l is the typical residual norm at layer l (it grows ~20x through SmolLM2's depth).
    weights = [nn.Parameter(w.detach().clone()) for w in lens.weight]
    biases = [nn.Parameter(b.detach().clone()) for b in lens.bias]
    scales = _residual_rms(heldout)
    optimizer = torch.optim.Adam(
        [
            {"params": [w, b], "lr": settings.lr / float(s)}
            for w, b, s in zip(weights, biases, scales, strict=True)
        ],
        weight_decay=settings.weight_decay,
    )
    L = lens.n_layers
    layers = (*lens.source_layers, L - 1)
    best_kl = _heldout_kl(lens, heldout)
    best_state = {k: v.detach().clone() for k, v in lens.state_dict().items()}
    history = [_history_rows(0, 0, time.perf_counter() - start, lens, best_kl)]
    tokens_seen = 0
    bar = tqdm(total=settings.max_steps, desc="tuned lens", unit="step", disable=not progress)
    step = 0
    for step, batch in enumerate(
        stream_residuals(
            model,
            stream_texts,
            layers=layers,
            batch_size=settings.batch_size,
            max_len=settings.max_len,
            progress=False,
        ),
        start=1,
    ):
        tokens_seen += len(batch)
        with torch.no_grad():
            log_p_all = lens(batch.at(L - 1), L - 1).float().log_softmax(-1)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        n = min(settings.tokens_per_layer, len(batch))
        for i in range(len(lens.source_layers)):
            rows = torch.randperm(len(batch), generator=generator)[:n].to(log_p_all.device)
            h = batch.resid[rows, i]
            with torch.autocast(device_type=log_p_all.device.type, dtype=torch.bfloat16):
                translated = h + h @ weights[i] + biases[i]
                logits = hooked.unembed(model, hooked.final_norm(model, translated))
            loss = _kl(log_p_all[rows], logits)
            loss.backward()
            total += loss.item()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(train_kl=f"{total / len(lens.source_layers):.3f}")
        out_of_time = (
            settings.time_limit_s is not None
            and time.perf_counter() - start > settings.time_limit_s
        )
        if step % settings.eval_every == 0 or step == settings.max_steps or out_of_time:
            with torch.no_grad():
                lens.weight.copy_(torch.stack(weights))
                lens.bias.copy_(torch.stack(biases))
            kl = _heldout_kl(lens, heldout)
            _keep_best_per_layer(lens, kl, best_kl, best_state)
            history.append(_history_rows(step, tokens_seen, time.perf_counter() - start, lens, kl))
        if out_of_time:
            break
    bar.close()
    lens.load_state_dict(best_state)
    lens.training_settings = {
        **asdict(settings),
        "steps": step,
        "tokens": tokens_seen,
        "seconds": round(time.perf_counter() - start, 1),
        "heldout_kl": [round(float(x), 5) for x in best_kl],
    }
    lens.requires_grad_(False)
    return lens.eval(), pd.concat(history, ignore_index=True)


def _initial_lens(model, texts, init, settings: TunedLensTraining, progress: bool) -> TunedLens:
    if isinstance(init, Lens):
        tuned = TunedLens.from_lens(model, init)
    elif init == "zero":
        tuned = TunedLens(model)
    elif init == "linear":
        from beyond_top1.lenses.linear import LinearShortcutLens

        linear = LinearShortcutLens.fit(
            model,
            texts[: settings.n_init_texts],
            bias=True,
            batch_size=settings.batch_size,
            max_len=settings.max_len,
            progress=progress,
        )
        tuned = TunedLens.from_lens(model, linear)
    else:
        raise ValueError(f"init must be 'linear', 'zero' or a Lens, got {init!r}")
    return tuned.requires_grad_(False)


def _keep_best_per_layer(lens: TunedLens, kl: Tensor, best_kl: Tensor, best_state: dict) -> None:
    """Per-layer checkpoint selection on held-out KL (updates ``best_kl``/``best_state``)."""
    with torch.no_grad():
        for i in range(len(lens.source_layers)):
            if math.isfinite(float(kl[i])) and kl[i] < best_kl[i]:
                best_kl[i] = kl[i]
                best_state["weight"][i] = lens.weight[i].detach()
                best_state["bias"][i] = lens.bias[i].detach()


def _history_rows(step, tokens, seconds, lens: TunedLens, kl: Tensor) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": step,
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "layer": list(lens.source_layers),
            "heldout_kl": kl.tolist(),
        }
    )


__all__ = ["TunedLens", "TunedLensTraining", "train_tuned_lens"]
