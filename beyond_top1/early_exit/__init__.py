"""Simulated token-level early exit (papers 001 and 004; docs/definitions.md, "Early exit").

**Simulation: no compute is skipped.** Every position goes through one full forward pass; its
signals (:class:`ExitSignals`, derived from one scan: :func:`collect_exit_signals`) record, per
position and layer, what each exit criterion reads, and the criteria then pick the layer at
which the position *would* have exited. **The real thing**, a decoder that stops computing at
the exit layer, is :func:`generate_early_exit`; its criteria carry the same names
(:func:`make_criterion`).

Modules: :mod:`~.signals` (what the criteria read), :mod:`~.criteria` (exit layers and their
metrics), :mod:`~.curves` (θ sweeps, layers saved), :mod:`~.better_lm` (001's better language
modelling test), :mod:`~.decoder` (the early-exit decoder).

Conventions. Layers ``0..L-1`` are ``blocks.{l}.hook_resid_post``. A position that exits after
block ``l`` uses ``l + 1`` layers and predicts the lens' top-1 at layer ``l``; a position whose
criterion never fires exits at ``L-1`` (uses ``L`` layers) and predicts the model's own top-1
(every lens is the identity at ``L-1``). Only positions with a gold next token are kept.

Criteria (``method``), each combined with a lens that makes the prediction it exits with:

* ``oracle``: exit at ``s_1`` **of the same lens** (the first layer of the final unbroken run in
  which that lens' top-1 equals the model's final top-1). Precision@1 = 1 by construction; the
  layers it uses are a floor for exit rules that must be right from the exit on.
* ``probe``: the first layer where a task probe (001) says the model is doing task ``>= 2``,
  i.e. the top-1 is settled. The probe is a :class:`~beyond_top1.probes.TaskProbe` or any
  object with ``predict(X[n, d_model]) -> task`` (1-based), applied to the ``resid_post`` of
  every layer (see :func:`~beyond_top1.probes.apply_probe`). 001's rule, one point per probe.
* ``probe_conf``: the first layer where the probe's probability of task ``>= 2`` is ``>= θ``
  (needs ``predict_proba`` and ``classes_``, as :class:`~beyond_top1.probes.TaskProbe` has): the
  probe rule as a sweepable curve.
* ``margin``: the first layer where ``p_1 - p_2 >= θ`` under the lens (CALM's softmax
  confidence, as in 001's baseline).
* ``cosine``: the first layer where ``cos(h_l, h_{l-1}) >= θ`` (``h_{-1}`` = the embedding);
  CALM's hidden-state saturation. The lens only makes the prediction.
* ``confidence_004``: 004's rule (the early-exit rule of Schuster et al. 2022 as 004 uses it):
  exit at the first layer where ``p_1 - p_2 > λ_t`` under the lens, with the position-dependent
  threshold ``λ_t = 0.9 λ + 0.1 exp(-τ t / N)``, ``t`` the 0-based token position, ``τ = 4`` and
  ``N`` the mean of ``t + 1`` over the evaluated positions (004: "the average length of the
  input until position t"). Early positions need more confidence. 004 allows an exit after any
  block (its ``minimal_layer = 1`` counts the embedding as layer 0), as here.
* ``fixed``: every position exits at layer ``θ`` (static exit; 004's comparison).

Metrics per method, lens and θ: Precision@1 against the model's final top-1, accuracy against
the gold next token and the mean number of layers used. Every result owns its arrays (001's
public code let methods write into one shared prediction array).
"""

import warnings

from beyond_top1.early_exit.better_lm import (
    BetterLMResult,
    better_language_modeling,
    two_proportion_ztest,
)
from beyond_top1.early_exit.criteria import (
    DEFAULT_BETTER_LM_MARGIN,
    METHODS,
    TAU_004,
    THRESHOLD_METHODS,
    ExitResult,
    confidence_threshold_004,
    default_thetas,
    exit_layers,
    first_firing_layer,
    simulate_exit,
)
from beyond_top1.early_exit.curves import best_at_budget, early_exit_curves, layers_saved_table
from beyond_top1.early_exit.decoder import (
    Confidence004Exit,
    CosineExit,
    Criterion,
    FixedLayerExit,
    Generation,
    GenerationBenchmark,
    LayerState,
    MarginExit,
    NeverExit,
    ProbeExit,
    benchmark_early_exit,
    generate_early_exit,
    greedy_reference,
    make_criterion,
)
from beyond_top1.early_exit.signals import (
    ExitSignals,
    collect_exit_signals,
    load_exit_signals,
    with_probe,
)
from beyond_top1.probes import apply_probe
from beyond_top1.scans import MARGIN_TOLERANCE

__all__ = [
    "Confidence004Exit",
    "CosineExit",
    "Criterion",
    "FixedLayerExit",
    "Generation",
    "GenerationBenchmark",
    "LayerState",
    "MarginExit",
    "NeverExit",
    "ProbeExit",
    "benchmark_early_exit",
    "generate_early_exit",
    "greedy_reference",
    "make_criterion",
    "DEFAULT_BETTER_LM_MARGIN",
    "MARGIN_TOLERANCE",
    "METHODS",
    "TAU_004",
    "THRESHOLD_METHODS",
    "BetterLMResult",
    "ExitResult",
    "ExitSignals",
    "best_at_budget",
    "better_language_modeling",
    "collect_exit_signals",
    "confidence_threshold_004",
    "default_thetas",
    "early_exit_curves",
    "exit_layers",
    "first_firing_layer",
    "layers_saved_table",
    "load_exit_signals",
    "simulate_exit",
    "two_proportion_ztest",
    "with_probe",
]


def __getattr__(name: str):
    """``probe_predict`` and ``probe_settled_probability``: deprecated, one release."""
    if name in ("probe_predict", "probe_settled_probability"):
        warnings.warn(
            f"beyond_top1.early_exit.{name} is replaced by beyond_top1.probes.apply_probe (the "
            "one way to apply a probe); the old name goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        column = 0 if name == "probe_predict" else 1

        def old(probe, resid):  # [n, d_model] rows, as before
            out = apply_probe(probe, resid[:, None, :])[column]
            return None if out is None else out[:, 0]

        return old
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
