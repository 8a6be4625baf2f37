"""How much data every stage of :func:`~beyond_top1.reproduce.reproduce` uses: the named scales
and ``--set KEY=VALUE`` overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from beyond_top1.ranking import PRECISIONS


@dataclass(frozen=True)
class Scale:
    """How much data every stage uses. Texts come from the Wikipedia summaries: lens fitting
    from the train split, everything else from the validation split (the early-exit texts
    follow the scan texts, so the probe is never evaluated on its own training texts)."""

    name: str
    max_len: int = 64  # tokens per text, every stage
    batch_size: int = 8
    precision: str = "bf16"  # lens read-outs of scans and early exit (bf16: same top-k ids)
    lens_fit_texts: int = 48  # train texts for the linear-shortcut lens
    tuned_lens: bool = False
    tuned_texts: int = 200  # train texts for the tuned lens
    tuned_steps: int = 60
    lens_eval_texts: int = 4  # val texts for evaluate_lenses
    scan_texts: int = 24  # val texts scanned per model (also the probe's and interventions')
    k: int = 5
    permutations: int = 1000
    twin_analyses: bool = False  # also probe / intervene on the untrained twins
    probe_k: int = 3
    probe_max_per_class: int = 100
    probe_folds: int = 4
    intervention_pairs: int = 12
    intervention_a: int | None = 3  # offsets d in [-a, a]; None: Δ // 2
    exit_texts: int = 12  # val texts after the scan texts
    generation_prompts: int = 1
    generation_tokens: int = 16
    refinement_items: int = 0  # 0: skip; else items per N in (5, 10, 20), 5 positions each
    replacement_fit_texts: int = 0  # 0: skip
    replacement_eval_texts: int = 6

    def __post_init__(self) -> None:
        """Refuse a setting that could only fail later, after earlier stages have run."""
        may_be_zero = {"refinement_items", "replacement_fit_texts", "intervention_a"}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "intervention_a" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            low = 0 if f.name in may_be_zero else 1
            if value < low:
                raise ValueError(f"scale setting {f.name} must be >= {low}, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (position 0 is not scored), got {self.max_len}")

    def describe(self) -> dict:
        return asdict(self)


SCALES = {
    # Tiny: for tests and smoke runs (seconds; the numbers mean nothing).
    "test": Scale(
        name="test",
        max_len=32,  # 12 texts x 32 tokens: enough pairs and probe classes on tiny random models
        batch_size=4,
        precision="fp32",  # bf16's fast path only pays off for real vocabularies and widths
        lens_fit_texts=6,
        lens_eval_texts=2,
        scan_texts=12,
        probe_max_per_class=50,
        probe_folds=2,
        intervention_pairs=3,
        intervention_a=1,
        exit_texts=3,
        generation_tokens=4,
        permutations=200,
    ),
    # Under 10 minutes on a 2-core CPU from a cold cache.
    "quick": Scale(name="quick"),
    # The papers' scale: 001 reads ~60K-100K tokens per model for the ordering and probes 500
    # texts; 004 fits its maps on 9,000 Wikipedia sentences and evaluates on 1,000.
    "paper": Scale(
        name="paper",
        max_len=128,
        lens_fit_texts=2000,
        tuned_lens=True,
        tuned_texts=1000,
        tuned_steps=120,
        lens_eval_texts=200,
        scan_texts=800,
        twin_analyses=True,
        probe_max_per_class=300,
        probe_folds=5,
        intervention_pairs=200,
        intervention_a=None,
        exit_texts=200,
        generation_prompts=20,
        generation_tokens=32,
        refinement_items=16,
        replacement_fit_texts=64,
        replacement_eval_texts=6,
    ),
}


def resolve_scale(scale: str | Scale, overrides: Mapping | None = None) -> Scale:
    """A :class:`Scale` by name (or as given) with ``overrides`` (``{field: value}``) applied."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
        scale = SCALES[scale]
    if overrides:
        known = {f.name: f for f in fields(Scale)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(
                f"unknown scale setting(s) {', '.join(unknown)}; settable: {', '.join(known)}"
            )
        scale = replace(scale, **dict(overrides))
    return scale


def parse_override(text: str) -> tuple[str, object]:
    """``"scan_texts=32"`` -> ``("scan_texts", 32)`` (the value typed as the field's default)."""
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    known = {f.name: f for f in fields(Scale)}
    if key not in known:
        raise ValueError(f"unknown scale setting {key!r}; settable: {', '.join(known)}")
    default = getattr(SCALES["quick"], key)
    if raw.lower() in ("none", "null"):
        return key, None
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{key} takes true/false, got {raw!r}")
        return key, raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int) or key == "intervention_a":
        return key, int(raw)
    if isinstance(default, float):
        return key, float(raw)
    return key, raw


__all__ = ["SCALES", "Scale", "parse_override", "resolve_scale"]
