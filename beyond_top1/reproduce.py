"""One command that runs every analysis as a cached, resumable stage and writes a report.

:func:`reproduce` (CLI: ``beyond-top1 reproduce --model M --scale quick|paper --out DIR``) runs,
each as a :mod:`beyond_top1.stages` stage under ``DIR/stages/<name>/``:

==================  ===========================================================================
``lens-linear``     fit the linear-shortcut lens (004's ``mat``) on train texts
``lens-tuned``      train a tuned lens (paper scale; optional at quick)
``lens-metrics``    ``evaluate_lenses``: r², Precision@k, surprisal, KL, CE per layer and lens
``scan-<model>``    ``bt.scan`` (logit lens, bf16 readout) of the model and each untrained twin
``ordering``        001's ordering statistics side by side, with figures
``probe-<model>``   task dataset + grouped cross-validation of the task probe (+ the fitted probe)
``interventions``   task-shift interventions (patch a source's state into a target)
``early-exit``      simulated token-level exit: curves, layers-saved table, 001's better-LM test
``generation``      the real early-exit decoder on prompts, against full greedy decoding
``refinement``      003's refinement gap vs. evidence position (paper scale / optional)
``replacement``     004's sub-module linear replacement (paper scale / optional)
``views``           per-token CircuitsVis views of a few prompts
==================  ===========================================================================

then writes ``DIR/report.html`` (self-contained, offline) and ``DIR/metrics.json`` (the
headline numbers of every stage, its settings, timings and package versions). A stage that
finished with the same settings is skipped; changing a setting reruns it and every stage after
it that depends on it; an interrupted scan continues from its last shard.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from beyond_top1 import hooked
from beyond_top1.fileio import (
    OutputFolder,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    to_jsonable,
)
from beyond_top1.interventions import SUMMARY_COLUMNS
from beyond_top1.saturation import ORDERING_LABELS
from beyond_top1.stages import StageRecord, Stages, StageUnavailable

HELDOUT_PROBE_FILE = "probe_heldout.safetensors"  # fitted on the first half of the texts

PROMPTS = (
    "The capital of France is Paris. The capital of Germany is",
    "The Eiffel Tower is in Paris, and the Colosseum is in",
)
GENERATION_PROMPT = "The history of the city begins in"


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
        from beyond_top1.ranking import PRECISIONS

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
        max_len=24,
        batch_size=4,
        precision="fp32",  # bf16's fast path only pays off for real vocabularies and widths
        lens_fit_texts=6,
        lens_eval_texts=2,
        scan_texts=8,
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


def default_twins(model_name: str) -> list[str]:
    """Untrained twins of a model name: its own architecture when it is an offline model, and
    GPT-2 small's."""
    from beyond_top1.models import OFFLINE_MODELS

    twins = []
    if not model_name.startswith("untrained:") and f"untrained:{model_name}" in OFFLINE_MODELS:
        twins.append(f"untrained:{model_name}")
    if model_name != "untrained:gpt2-small":
        twins.append("untrained:gpt2-small")
    return twins


def slug(name: str) -> str:
    """A model name as a folder name (``untrained:gpt2-small`` -> ``untrained-gpt2-small``)."""
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return out.strip("-.") or "model"


# ---------------------------------------------------------------------------------------------
# Models and texts
# ---------------------------------------------------------------------------------------------


class _Model:
    """A model given by name (loaded on first use) or as a ``HookedTransformer``."""

    def __init__(self, label: str, source, *, device: str, seed: int):
        self.label = label
        self._source = source
        self._model = None if isinstance(source, str) else source
        self.device, self.seed = device, seed

    @property
    def model(self):
        if self._model is None:
            from beyond_top1.models import load_model

            self._model = load_model(self._source, device=self.device, seed=self.seed)
        return self._model

    def identity(self) -> dict:
        """What ties a stage to this model: its name and seed, or the weights' fingerprint."""
        if isinstance(self._source, str):
            return {"model": self._source, "model_seed": self.seed}
        return {
            "model": self.label,
            "unembedding_fingerprint": hooked.unembedding_fingerprint(self._model),
        }


def _texts(split: str, start: int, stop: int, seed: int) -> list[str]:
    from beyond_top1.data import wiki_texts

    return wiki_texts(stop, split=split, seed=seed)[start:stop]


def _texts_settings(split: str, start: int, stop: int, seed: int) -> dict:
    return {"split": split, "start": start, "stop": stop, "seed": seed}


# ---------------------------------------------------------------------------------------------
# Small helpers for stage functions
# ---------------------------------------------------------------------------------------------


def _save_figure(fig, folder: Path, name: str) -> Path:
    from beyond_top1.figures import save_figure

    png, _ = save_figure(fig, folder / "figures" / name)
    return png


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    return atomic_write_text(path, frame.to_csv(index=False))


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _lens_dirs(records: Mapping[str, StageRecord]) -> dict[str, Path]:
    out = {}
    for name, kind in (("lens-linear", "linear"), ("lens-tuned", "tuned")):
        record = records.get(name)
        if record is not None and record.ok:
            out[kind] = record.directory / "lens"
    return out


def _load_lenses(model, records: Mapping[str, StageRecord]) -> dict:
    from beyond_top1.lenses import LogitLens, load_lens

    lenses = {"logit": LogitLens(model)}
    for kind, folder in _lens_dirs(records).items():
        lenses[kind] = load_lens(folder, model)
    return lenses


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class Reproduction:
    """What :func:`reproduce` did: the stage records, the report and the metrics file."""

    out: Path
    scale: Scale
    records: dict[str, StageRecord]
    report: Path
    metrics: Path
    seconds: float
    settings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per stage: status, whether it was cached, seconds."""
        return pd.DataFrame(
            [
                {
                    "stage": name,
                    "status": rec.status,
                    "cached": rec.cached,
                    "seconds": round(rec.seconds, 1),
                }
                for name, rec in self.records.items()
            ]
        )

    def __repr__(self) -> str:
        ran = sum(not r.cached for r in self.records.values())
        return (
            f"Reproduction({self.out}, scale={self.scale.name!r}, {len(self.records)} stages, "
            f"{ran} run now, {self.seconds:.0f} s)"
        )


def reproduce(
    model="smollm2-135m",
    out: str | Path = "runs/quick",
    *,
    scale: str | Scale = "quick",
    overrides: Mapping | None = None,
    twins: Sequence | Mapping | None = None,
    seed: int = 0,
    device: str = "cpu",
    force: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Reproduction:
    """Run every analysis as a cached stage under ``out/stages`` and write the report.

    Args:
        model: a model name (see :func:`beyond_top1.load_model`) or a ``HookedTransformer``.
        out: the output folder (``report.html``, ``metrics.json``, ``stages/``).
        scale: ``"quick"`` (under 10 minutes on 2 CPU cores), ``"paper"`` (the papers' scale;
            hours on a CPU), ``"test"`` (seconds), or a :class:`Scale`.
        overrides: ``{scale field: value}`` on top of ``scale``.
        twins: untrained twins to scan next to the model: names, or ``{label: model}``
            (default: :func:`default_twins` of a model name; none for a model object).
        seed: for untrained models, text order, probes and pairs.
        force: stage names to rerun even when finished.
        progress: progress bars of the analyses (stage lines go to ``log``).
    """
    start = time.perf_counter()
    scale = resolve_scale(scale, overrides)
    out = check_output_dir(out)
    say = log or (lambda _line: None)
    label = model if isinstance(model, str) else hooked.model_name(model)
    main = _Model(label, model, device=device, seed=seed)
    if twins is None:
        twins = default_twins(label) if isinstance(model, str) else []
    if isinstance(twins, Mapping):
        twin_models = [_Model(str(k), v, device=device, seed=seed) for k, v in twins.items()]
    else:
        twin_models = [_Model(str(t), t, device=device, seed=seed) for t in dict.fromkeys(twins)]
    if label in {t.label for t in twin_models}:
        raise ValueError(f"twin {label!r} is the model itself; name other models as twins")
    stages = Stages(out / "stages", force=force, log=say)
    ctx = _Context(scale, seed, progress, main, twin_models, stages)
    unknown = sorted(set(force) - set(ctx.planned_stages()))
    if unknown:
        raise ValueError(
            f"--force {', '.join(unknown)}: no such stage at this scale; the stages are "
            f"{', '.join(ctx.planned_stages())}"
        )
    say(
        f"reproduce: {label} (twins: {', '.join(t.label for t in twin_models) or 'none'}), "
        f"scale {scale.name!r} -> {out}"
    )
    with OutputFolder(out, "reproduce", adopt=_legacy_run_files(out)) as folder:  # one writer
        folder.claim("stages")  # stage folders are emptied when their settings change
        ctx.run_all()
        seconds = time.perf_counter() - start
        return _write_outputs(folder, scale, stages, label, twin_models, seed, device, seconds, say)


def _legacy_run_files(out: Path) -> tuple[str, ...]:
    """A run folder written before folders kept a record of their files: ``metrics.json`` of
    this pipeline makes its files ours."""
    try:
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    ours = isinstance(metrics, dict) and {"stages", "scale", "environment"} <= set(metrics)
    return ("stages", "metrics.json", "report.html") if ours else ()


def _write_outputs(folder, scale, stages, label, twin_models, seed, device, seconds, say):
    """``metrics.json`` and ``report.html`` of a finished run."""
    out = folder.path
    settings = {
        "model": label,
        "twins": [t.label for t in twin_models],
        "scale": scale.describe(),
        "seed": seed,
        "device": device,
        "prompts": list(PROMPTS),
    }
    from beyond_top1.report import environment

    env = environment()
    metrics = {
        "model": label,
        "scale": scale.name,
        "settings": settings,
        "environment": env,
        "seconds_this_run": round(seconds, 1),
        "stages": {name: rec.to_json() for name, rec in stages.records.items()},
    }
    metrics_path = folder.write_json("metrics.json", metrics)
    from beyond_top1.reproduce_report import build_report

    report = build_report(out, stages.records, settings, env, seconds)
    report_path = folder.write_text("report.html", report.html())
    say(f"wrote {report_path} and {metrics_path} ({seconds:.0f} s this run)")
    return Reproduction(
        out, scale, dict(stages.records), report_path, metrics_path, seconds, settings
    )


class _Context:
    """The stage functions of one :func:`reproduce` run (they share models and records)."""

    def __init__(self, scale: Scale, seed: int, progress: bool, main: _Model, twins, stages):
        self.scale, self.seed, self.progress = scale, seed, progress
        self.main, self.twins, self.stages = main, list(twins), stages
        self.records = stages.records

    # --- texts -------------------------------------------------------------------------------

    def scan_texts(self) -> tuple[list[str], dict]:
        n = self.scale.scan_texts
        return _texts("val", 0, n, self.seed), _texts_settings("val", 0, n, self.seed)

    def exit_texts(self) -> tuple[list[str], dict]:
        a, b = self.scale.scan_texts, self.scale.scan_texts + self.scale.exit_texts
        return _texts("val", a, b, self.seed), _texts_settings("val", a, b, self.seed)

    # --- the order of things -----------------------------------------------------------------

    def planned_stages(self) -> list[str]:
        """The names of the stages :meth:`run_all` runs at this scale, in order."""
        s = self.scale
        models = [self.main, *self.twins]
        probed = [self.main, *(self.twins if s.twin_analyses else [])]
        names = ["lens-linear", *(["lens-tuned"] if s.tuned_lens else []), "lens-metrics"]
        names += [f"scan-{slug(m.label)}" for m in models] + ["ordering"]
        names += [f"probe-{slug(m.label)}" for m in probed]
        names += [
            "interventions" if m is self.main else f"interventions-{slug(m.label)}" for m in probed
        ]
        names += ["early-exit", "generation"]
        names += ["refinement"] * bool(s.refinement_items)
        names += ["replacement"] * bool(s.replacement_fit_texts)
        return [*names, "views"]

    def run_all(self) -> None:
        s = self.scale
        linear = self.lens_linear()
        lens_stages = [linear]
        if s.tuned_lens:
            lens_stages.append(self.lens_tuned())
        self.lens_metrics(lens_stages)
        scans = {m.label: self.scan(m) for m in [self.main, *self.twins]}
        self.ordering(list(scans.values()))
        probed = [self.main, *(self.twins if s.twin_analyses else [])]
        probes = {m.label: self.probe(m, scans[m.label]) for m in probed}
        for m in probed:
            self.interventions(m, scans[m.label], probes[m.label])
        exit_stage = self.early_exit(lens_stages, probes[self.main.label])
        self.generation(lens_stages, exit_stage)
        if s.refinement_items:
            self.refinement(linear)
        if s.replacement_fit_texts:
            self.replacement()
        self.views(lens_stages)

    # --- lenses ------------------------------------------------------------------------------

    def lens_linear(self) -> StageRecord:
        s = self.scale
        settings = {
            **self.main.identity(),
            "texts": _texts_settings("train", 0, s.lens_fit_texts, self.seed),
            "max_len": s.max_len,
            "batch_size": s.batch_size,
            "ridge": "default",
        }

        def run(folder: Path) -> dict:
            from beyond_top1.lenses import LinearShortcutLens

            texts = _texts("train", 0, s.lens_fit_texts, self.seed)
            lens = LinearShortcutLens.fit(
                self.main.model,
                texts,
                batch_size=s.batch_size,
                max_len=s.max_len,
                description=f"wiki_texts({s.lens_fit_texts}, split='train', seed={self.seed})",
                progress=self.progress,
            )
            lens.save(folder / "lens")
            fit = lens.fit_settings
            return {"n_texts": fit["n_texts"], "n_tokens": fit["n_tokens"]}

        return self.stages.run(
            "lens-linear",
            settings,
            run,
            describe=f"least squares on {s.lens_fit_texts} train texts × ≤{s.max_len} tokens",
        )

    def lens_tuned(self) -> StageRecord:
        s = self.scale
        settings = {
            **self.main.identity(),
            "texts": _texts_settings("train", 0, s.tuned_texts, self.seed),
            "max_len": s.max_len,
            "batch_size": s.batch_size,
            "max_steps": s.tuned_steps,
        }

        def run(folder: Path) -> dict:
            from beyond_top1.lenses.tuned import train_tuned_lens

            texts = _texts("train", 0, s.tuned_texts, self.seed)
            lens, history = train_tuned_lens(
                self.main.model,
                texts,
                batch_size=s.batch_size,
                max_len=s.max_len,
                max_steps=s.tuned_steps,
                seed=self.seed,
                progress=self.progress,
            )
            lens.save(folder / "lens")
            _write_csv(history, folder / "training_history.csv")
            return {  # the saved lens keeps each layer's best checkpoint
                "steps": int(history["step"].max()),
                "heldout_kl": statistics.fmean(lens.training_settings["heldout_kl"]),
            }

        return self.stages.run(
            "lens-tuned",
            settings,
            run,
            describe=f"{s.tuned_steps} steps on {s.tuned_texts} train texts",
        )

    def lens_metrics(self, lens_stages: list[StageRecord]) -> StageRecord:
        s = self.scale
        settings = {
            **self.main.identity(),
            "texts": _texts_settings("val", 0, s.lens_eval_texts, self.seed),
            "max_len": s.max_len,
            "batch_size": s.batch_size,
        }

        def run(folder: Path) -> dict:
            from beyond_top1.figures import plot_lens_metrics
            from beyond_top1.lenses.metrics import evaluate_lenses

            model = self.main.model
            lenses = _load_lenses(model, self.records)
            texts = _texts("val", 0, s.lens_eval_texts, self.seed)
            frame = evaluate_lenses(
                model,
                lenses,
                texts,
                batch_size=s.batch_size,
                max_len=s.max_len,
                progress=self.progress,
            )
            _write_csv(frame, folder / "lens_metrics.csv")
            for metric, fig in plot_lens_metrics(frame).items():
                _save_figure(fig, folder, metric)
            return _lens_headline(frame, hooked.n_layers(model))

        return self.stages.run(
            "lens-metrics",
            settings,
            run,
            after=lens_stages,
            describe=f"{s.lens_eval_texts} val texts",
        )

    # --- scans and ordering ------------------------------------------------------------------

    def scan(self, m: _Model) -> StageRecord:
        s = self.scale
        texts_settings = self.scan_texts()[1]
        settings = {
            **m.identity(),
            "texts": texts_settings,
            "lens": "logit",
            "k": s.k,
            "precision": s.precision,
            "max_len": s.max_len,
            "batch_size": s.batch_size,
            "permutations": s.permutations,
        }

        def run(folder: Path) -> dict:
            from beyond_top1.scans import SUMMARY_FILE, load_scan, scan

            target = folder / "scan"
            if (target / SUMMARY_FILE).is_file():
                result = load_scan(target)  # finished before the marker was written
            else:
                texts = self.scan_texts()[0]
                result = scan(
                    m.model,
                    texts,
                    k=s.k,
                    batch_size=s.batch_size,
                    max_len=s.max_len,
                    precision=s.precision,
                    out=target,
                    resume=True,
                    lens_source="logit",
                    texts_description=(
                        f"wiki_texts({s.scan_texts}, split='val', seed={self.seed})"
                    ),
                    n_permutations=s.permutations,
                    progress=self.progress,
                )
            summary = _read_json(target / SUMMARY_FILE)
            out = {
                "n_layers": result.n_layers,
                "n_positions": len(result),
                "mean_saturation_layer": summary.get("mean_saturation_layer"),
            }
            if "ordering" in summary:
                out["ordering"] = {
                    key: summary["ordering"].get(key)
                    for key in ORDERING_LABELS
                    if key != "n_positions"
                }
            timing = target / "timing.json"
            if timing.is_file():
                out["tokens_per_second"] = _read_json(timing).get("tokens_per_second")
            return out

        return self.stages.run(
            f"scan-{slug(m.label)}",
            settings,
            run,
            describe=f"{m.label}, {s.scan_texts} val texts × ≤{s.max_len} tokens, k={s.k}, "
            f"{s.precision}",
        )

    def ordering(self, scans: list[StageRecord]) -> StageRecord:
        s = self.scale
        settings = {"permutations": s.permutations, "seed": self.seed}

        def run(folder: Path) -> dict:
            from beyond_top1.figures import (
                plot_ordering_comparison,
                plot_rank_correspondence,
                plot_saturation_histograms,
            )
            from beyond_top1.scans import load_scan

            stats, loaded = {}, {}
            labels = [self.main.label, *[t.label for t in self.twins]]
            for label, record in zip(labels, scans, strict=True):
                result = load_scan(record.directory / "scan")
                loaded[label] = result
                if result.k >= 3 and len(result):
                    stats[label] = result.ordering(n_permutations=s.permutations, seed=self.seed)
            if not stats:
                raise StageUnavailable("no scan has k >= 3 and scored positions")
            table = pd.DataFrame([{"model": label, **st.summary()} for label, st in stats.items()])
            _write_csv(table, folder / "ordering.csv")
            corr = pd.concat(
                [st.rank_correspondence.assign(model=label) for label, st in stats.items()]
            )
            _write_csv(corr, folder / "rank_correspondence.csv")
            wrapped = {label.replace(":", ":\n"): st for label, st in stats.items()}
            _save_figure(plot_ordering_comparison(wrapped), folder, "ordering_comparison")
            _save_figure(plot_rank_correspondence(stats), folder, "rank_correspondence")
            _save_figure(plot_saturation_histograms(stats), folder, "saturation_histograms")
            keys = (
                "n_kept",
                "mean_tau",
                "tau_se",
                "p_value_kept",
                "p_value_all",
                "n_permutations",
                "frac_strictly_increasing",
            )
            return {label: {k: st.summary().get(k) for k in keys} for label, st in stats.items()}

        return self.stages.run("ordering", settings, run, after=scans, describe="001's statistics")

    # --- probes and interventions ------------------------------------------------------------

    def probe(self, m: _Model, scan_stage: StageRecord) -> StageRecord:
        s = self.scale
        settings = {
            **m.identity(),
            "k": s.probe_k,
            "max_per_class": s.probe_max_per_class,
            "folds": s.probe_folds,
            "features": "raw",
            "seed": self.seed,
        }

        def run(folder: Path) -> dict:
            from beyond_top1.figures import plot_probe_per_layer
            from beyond_top1.probes import TaskProbe, cross_validate_task_probe, task_dataset
            from beyond_top1.scans import load_scan

            if not scan_stage.ok:
                raise StageUnavailable(f"{scan_stage.name} is unavailable")
            result = load_scan(scan_stage.directory / "scan")
            if result.k < s.probe_k:
                raise StageUnavailable(f"the scan tracks k={result.k} < probe k={s.probe_k}")
            texts = self.scan_texts()[0]
            try:
                data = task_dataset(
                    m.model,
                    result,
                    texts,
                    k=s.probe_k,
                    max_per_class=s.probe_max_per_class,
                    seed=self.seed,
                    progress=self.progress,
                )
                if len(data) == 0:
                    raise ValueError("no probe rows: no layer has every task 1..k")
                cv = cross_validate_task_probe(data, n_splits=s.probe_folds, seed=self.seed)
                probe = TaskProbe().fit(data)
                # the interventions' evidence: a probe that never saw their target texts
                fit_half = data.groups < len(texts) // 2
                heldout = TaskProbe().fit(data.subset(np.flatnonzero(fit_half)))
            except ValueError as exc:
                raise StageUnavailable(f"task probe: {exc}") from None
            probe.save(folder / "probe.safetensors")
            heldout.save(folder / HELDOUT_PROBE_FILE)
            _write_csv(cv.folds, folder / "cv_folds.csv")
            _write_csv(cv.per_class, folder / "cv_per_class.csv")
            _write_csv(cv.per_layer, folder / "cv_per_layer.csv")
            _write_csv(data.counts().reset_index(), folder / "rows_per_layer.csv")
            summary = cv.summary()
            atomic_write_json(folder / "cv.json", {"dataset": data.summary(), "cv": summary})
            _save_figure(
                plot_probe_per_layer(cv.per_layer, chance=1 / data.k, min_n=5),
                folder,
                "probe_per_layer",
            )
            keys = (
                "balanced_accuracy_mean",
                "balanced_accuracy_se",
                "shuffled_balanced_accuracy_mean",
                "shuffled_balanced_accuracy_se",
                "macro_auc_mean",
                "shuffled_macro_auc_mean",
                "n_splits",
            )
            ds = data.summary()
            return {
                "k": data.k,
                "n_rows": ds["n_rows"],
                "n_texts": ds["n_texts"],
                "layers": [min(ds["layers"]), max(ds["layers"])],
                "chance": 1 / data.k,
                **{key: summary.get(key) for key in keys},
            }

        return self.stages.run(
            f"probe-{slug(m.label)}",
            settings,
            run,
            after=[scan_stage],
            describe=f"{m.label}, k={s.probe_k}, {s.probe_folds}-fold GroupKFold by text",
        )

    def interventions(self, m: _Model, scan_stage: StageRecord, probe_stage) -> StageRecord:
        s = self.scale
        name = "interventions" if m is self.main else f"interventions-{slug(m.label)}"
        settings = {
            **m.identity(),
            "max_pairs": s.intervention_pairs,
            "a": s.intervention_a,
            "engine": "cached",
            "controls": True,
            "seed": self.seed,
        }

        def run(folder: Path) -> dict:
            from beyond_top1.figures import plot_intervention_success
            from beyond_top1.interventions import intervene
            from beyond_top1.probes import load_probe
            from beyond_top1.scans import load_scan

            if not scan_stage.ok:
                raise StageUnavailable(f"{scan_stage.name} is unavailable")
            result = load_scan(scan_stage.directory / "scan")
            probe = None
            if probe_stage is not None and probe_stage.ok:
                probe = load_probe(probe_stage.directory / HELDOUT_PROBE_FILE, m.model)
            texts = self.scan_texts()[0]
            try:
                outcome = intervene(
                    m.model,
                    result,
                    texts,
                    a=s.intervention_a,
                    max_pairs=s.intervention_pairs,
                    text_ids=range(len(texts) // 2, len(texts)),  # the held-out probe's
                    probe=probe,
                    seed=self.seed,
                    progress=self.progress,
                )
            except ValueError as exc:
                raise StageUnavailable(f"interventions: {exc}") from None
            if len(outcome.pairs) == 0:
                raise StageUnavailable(
                    "no source/target pairs (same text, same final top-1, s_1 gap >= Δ): "
                    "scan more texts"
                )
            outcome.save(folder)
            by_offset = outcome.by_offset()
            if len(by_offset):
                _save_figure(plot_intervention_success(by_offset), folder, "intervention_success")
            by_sign = outcome.by_sign()
            out = {"n_pairs": len(outcome.pairs), "delta": outcome.settings.get("delta")}
            for row in by_sign.to_dict(orient="records"):
                key = "d_ge_0" if ">=" in str(row["offsets"]) else "d_lt_0"
                out[key] = {c: row.get(c) for c in SUMMARY_COLUMNS if c in row}
            return out

        after = [scan_stage] + ([probe_stage] if probe_stage is not None else [])
        return self.stages.run(
            name,
            settings,
            run,
            after=after,
            describe=f"{m.label}, ≤{s.intervention_pairs} pairs",
        )

    # --- early exit --------------------------------------------------------------------------

    def early_exit(self, lens_stages: list[StageRecord], probe_stage: StageRecord) -> StageRecord:
        s = self.scale
        settings = {
            **self.main.identity(),
            "texts": self.exit_texts()[1],
            "max_len": s.max_len,
            "batch_size": s.batch_size,
            "precision": s.precision,
            "better_lm_m": "min(6, L - 2)",
        }

        def run(folder: Path) -> dict:
            from beyond_top1.early_exit import (
                DEFAULT_BETTER_LM_MARGIN,
                better_language_modeling,
                collect_exit_signals,
                early_exit_curves,
                layers_saved_table,
            )
            from beyond_top1.figures import plot_early_exit_curves
            from beyond_top1.probes import load_probe

            model = self.main.model
            lenses = _load_lenses(model, self.records)
            probe = None
            if probe_stage.ok:
                probe = load_probe(probe_stage.directory / "probe.safetensors", model)
            texts = self.exit_texts()[0]
            if not texts:
                raise StageUnavailable("no early-exit texts (exit_texts = 0)")
            signals = collect_exit_signals(
                model,
                texts,
                lenses,
                probe=probe,
                batch_size=s.batch_size,
                max_len=s.max_len,
                precision=s.precision,
                progress=self.progress,
            )
            if len(signals) == 0:
                raise StageUnavailable("no positions with a next token in the early-exit texts")
            signals.save(folder / "signals")
            curves = early_exit_curves(signals)
            table = layers_saved_table(curves)
            _write_csv(curves, folder / "curves.csv")
            _write_csv(table, folder / "layers_saved.csv")
            m = min(DEFAULT_BETTER_LM_MARGIN, signals.n_layers - 2)
            better = better_language_modeling(signals, m=m).to_dict()
            atomic_write_json(folder / "better_lm.json", better)
            _save_figure(plot_early_exit_curves(curves), folder, "early_exit")
            full = curves[curves["method"] == "full"].iloc[0]
            return {
                "n_positions": len(signals),
                "full_accuracy": float(full["accuracy"]),
                "layers_saved": [
                    {
                        key: row[key]
                        for key in ("method", "lens", "saved_at_95", "saved_at_99", "theta_at_95")
                    }
                    for row in table.to_dict(orient="records")
                ],
                "better_lm": {
                    k: better[k]
                    for k in ("rate_early", "rate_late", "n_early", "n_late", "p_value")
                },
            }

        return self.stages.run(
            "early-exit",
            settings,
            run,
            after=[*lens_stages, probe_stage],
            describe=f"simulation on {s.exit_texts} val texts",
        )

    def generation(self, lens_stages: list[StageRecord], exit_stage: StageRecord) -> StageRecord:
        s = self.scale
        settings = {
            **self.main.identity(),
            "prompts": s.generation_prompts,
            "new_tokens": s.generation_tokens,
            "criterion": "margin or cosine, whichever saves more layers at 95% Precision@1",
        }

        def run(folder: Path) -> dict:
            model = self.main.model
            lenses = _load_lenses(model, self.records)
            lens_name = "linear" if "linear" in lenses else "logit"
            criterion, described, source = _exit_criterion(exit_stage, lens_name)
            prompts = [GENERATION_PROMPT, *_generation_prompts(self, s.generation_prompts - 1)]
            prompts = prompts[: max(1, s.generation_prompts)]
            with _one_thread():  # batch-1 decoding: many tiny ops, one thread is faster
                bench, full, early = _decode(
                    model, prompts, criterion, lenses[lens_name], lens_name, s.generation_tokens
                )
            summary = bench.summary()
            _write_csv(summary, folder / "generation.csv")
            _write_csv(bench.per_prompt, folder / "generation_per_prompt.csv")
            example = {
                "prompt": prompts[0],
                "full_text": full.text,
                "early_exit_text": early.text,
                "tokens": list(hooked.token_strings(model, early.token_ids)),
                "layers_used": [int(x) for x in early.layers_used],
                "n_layers": early.n_layers,
            }
            atomic_write_json(folder / "example.json", example)
            row = summary.iloc[0]
            return {
                "criterion": described,
                "theta_source": source,
                "prompts": len(prompts),
                "new_tokens": int(row["new_tokens"]),
                "speedup": float(row["speedup"]),
                "agreement": float(row["agreement"]),
                "same_prefix_agreement": float(row["same_prefix_agreement"]),
                "mean_layers": float(row["mean_layers"]),
                "fraction_layers_saved": float(row["fraction_layers_saved"]),
            }

        return self.stages.run(
            "generation",
            settings,
            run,
            after=[*lens_stages, exit_stage],
            describe=f"{s.generation_prompts} prompt(s) × {s.generation_tokens} tokens",
        )

    # --- optional: refinement gap and sub-module replacement ---------------------------------

    def refinement(self, linear_stage: StageRecord) -> StageRecord:
        s = self.scale
        settings = {
            **self.main.identity(),
            "n_items": s.refinement_items,
            "n_docs": [5, 10, 20],
            "positions": 5,
            "task": "kv",
            "seed": self.seed,
        }

        def run(folder: Path) -> dict:
            from beyond_top1.figures import plot_refinement_gap
            from beyond_top1.refinement import (
                make_questions,
                read_questions,
                refinement_table,
                save_questions,
            )

            model = self.main.model
            lenses = _load_lenses(model, self.records)
            lenses.pop("tuned", None)
            questions = make_questions(
                model, n_items=s.refinement_items, positions=5, seed=self.seed
            )
            save_questions(questions, folder / "questions.jsonl")
            try:
                frame = read_questions(model, questions, lenses, progress=self.progress)
            except ValueError as exc:  # e.g. prompts longer than a small model's context
                raise StageUnavailable(f"refinement gap: {exc}") from None
            _write_csv(frame, folder / "answers.csv")
            table = refinement_table(frame)
            _write_csv(table, folder / "refinement.csv")
            for name in lenses:
                _save_figure(plot_refinement_gap(table, lens=name), folder, f"refinement_{name}")
            correct = frame[frame["correct"]]
            return {
                "n_prompts": int(frame["qid"].nunique()),
                "accuracy": float(frame.drop_duplicates("qid")["correct"].mean()),
                "mean_gap": {
                    name: float(part["gap"].astype(float).mean())
                    for name, part in correct.groupby("lens")
                },
            }

        return self.stages.run(
            "refinement",
            settings,
            run,
            after=[linear_stage],
            describe=f"{s.refinement_items} items × N ∈ (5, 10, 20) × 5 positions",
        )

    def replacement(self) -> StageRecord:
        s = self.scale
        settings = {
            **self.main.identity(),
            "fit_texts": _texts_settings("train", 0, s.replacement_fit_texts, self.seed),
            "eval_texts": _texts_settings("val", 0, s.replacement_eval_texts, self.seed),
            "fit_max_len": s.max_len,
            "eval_max_len": 64,
        }

        def run(folder: Path) -> dict:
            from beyond_top1.figures import plot_submodule_replacement
            from beyond_top1.replacement import (
                evaluate_replacements,
                fit_submodule_maps,
                replacement_summary,
            )

            model = self.main.model
            maps = fit_submodule_maps(
                model,
                _texts("train", 0, s.replacement_fit_texts, self.seed),
                max_len=s.max_len,
                progress=self.progress,
            )
            frame = evaluate_replacements(
                model,
                maps,
                _texts("val", 0, s.replacement_eval_texts, self.seed),
                max_len=64,
                progress=self.progress,
            )
            _write_csv(frame, folder / "replacement.csv")
            _save_figure(plot_submodule_replacement(frame), folder, "submodule_replacement")
            means = replacement_summary(frame)
            return {
                f"{kind}/{variant}": {
                    "precision_at_1": float(means.loc[kind, ("precision_at_1", variant)]),
                    "kl": float(means.loc[kind, ("kl", variant)]),
                }
                for kind in means.index
                for variant in means["precision_at_1"].columns
            }

        return self.stages.run(
            "replacement",
            settings,
            run,
            describe=f"fit on {s.replacement_fit_texts} train texts",
        )

    # --- per-token views ---------------------------------------------------------------------

    def views(self, lens_stages: list[StageRecord]) -> StageRecord:
        settings = {**self.main.identity(), "prompts": list(PROMPTS), "k": 5}

        def run(folder: Path) -> dict:
            from beyond_top1 import viz
            from beyond_top1.trajectory import trajectory

            model = self.main.model
            lenses = _load_lenses(model, self.records)
            views = {}
            first = {
                name: trajectory(model, PROMPTS[0], lens=lens, k=5) for name, lens in lenses.items()
            }
            views["trajectory_logit"] = viz.trajectory_view(first["logit"])
            if "linear" in first:
                views["compare_logit_linear"] = viz.compare_lenses(first["logit"], first["linear"])
            second = trajectory(model, PROMPTS[1], lens=lenses["logit"], k=5)
            views["token_log_probs"] = viz.token_log_probs(second)
            views["saturation_tokens"] = viz.colored_tokens_multi(second)
            index = []
            for key, view in views.items():
                view.save(folder / f"{key}.html")  # standalone offline page
                atomic_write_text(folder / f"{key}.body.html", view.body())  # for the report
                index.append({"key": key, "title": view.title, "components": view.components})
            atomic_write_json(folder / "views.json", index)
            out = {}
            for name, traj in first.items():
                final = traj.top_ids[-1, -1, 0]
                out[name] = {
                    "final_top1": traj.vocab[int(final)],
                    "s_1_last_position": int(traj.s[-1, 0]),
                }
            return {"prompt": PROMPTS[0], "last_position": out}

        return self.stages.run(
            "views", settings, run, after=lens_stages, describe="CircuitsVis views of 2 prompts"
        )


# ---------------------------------------------------------------------------------------------
# Headline helpers
# ---------------------------------------------------------------------------------------------


def _lens_headline(frame: pd.DataFrame, n_layers: int) -> dict:
    """Per lens: KL and Precision@1 at a quarter, half and three quarters of the depth, and
    their means over layers."""
    marks = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
    out = {"layers_reported": marks}
    for name, rows in frame.groupby("lens", sort=False):
        rows = rows.set_index("layer")
        entry = {
            "mean_kl": float(rows["kl"].mean()),
            "mean_precision_at_1": float(rows["precision_at_1"].mean()),
            "n_tokens": int(rows["n_tokens"].iloc[0]),
        }
        for layer in marks:
            if layer in rows.index:
                entry[f"kl_layer_{layer}"] = float(rows.loc[layer, "kl"])
                entry[f"precision_at_1_layer_{layer}"] = float(rows.loc[layer, "precision_at_1"])
        out[str(name)] = entry
    return out


def _exit_criterion(exit_stage: StageRecord, lens: str):
    """The decoder's criterion: of ``margin`` and ``cosine`` under ``lens``, the one that saved
    more layers at 95% Precision@1 in the simulation, at that θ (``margin`` 0.9 if neither
    reached 95%). Returns ``(criterion, description, where θ came from)``."""
    from beyond_top1.generation import CosineExit, MarginExit

    best = None
    if exit_stage.ok:
        for row in exit_stage.metrics.get("layers_saved", []):
            if row.get("lens") != lens or row.get("method") not in ("margin", "cosine"):
                continue
            saved, theta = row.get("saved_at_95"), row.get("theta_at_95")
            if saved is None or theta is None or math.isnan(saved) or math.isnan(theta):
                continue
            if best is None or saved > best[0]:
                best = (saved, row["method"], float(theta))
    if best is None:
        return MarginExit(0.9), f"margin p1-p2 >= 0.9 under the {lens} lens", "default"
    _, method, theta = best
    source = "simulation: fewest layers at >= 95% Precision@1"
    if method == "cosine":
        return CosineExit(theta), f"cos(h_l, h_l-1) >= {theta:.4g} ({lens} lens)", source
    return MarginExit(theta), f"margin p1-p2 >= {theta:.4g} under the {lens} lens", source


@contextmanager
def _one_thread():
    """Torch on one CPU thread inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _decode(model, prompts, criterion, lens, lens_name: str, new_tokens: int):
    """The benchmark of one criterion against full greedy decoding, and both decodes of the
    first prompt with their text."""
    from beyond_top1.generation import benchmark_early_exit, generate_early_exit

    bench = benchmark_early_exit(
        model, prompts, {f"early exit/{lens_name}": (criterion, lens)}, max_new_tokens=new_tokens
    )
    full = generate_early_exit(model, prompts[0], None, max_new_tokens=new_tokens, decode_text=True)
    early = generate_early_exit(
        model, prompts[0], criterion, lens=lens, max_new_tokens=new_tokens, decode_text=True
    )
    return bench, full, early


def _generation_prompts(ctx: _Context, n: int) -> list[str]:
    if n <= 0:
        return []
    texts = ctx.exit_texts()[0] or ctx.scan_texts()[0]
    return [" ".join(t.split()[:24]) for t in texts[:n]]


def load_metrics(out: str | Path) -> dict:
    """``out/metrics.json`` of a finished :func:`reproduce` run."""
    return _read_json(Path(out) / "metrics.json")


def headline(metrics: Mapping) -> dict:
    """The few numbers of each stage worth a glance, flattened (``{"stage.key": value}``)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            return
        else:
            flat[prefix] = value

    for name, stage in metrics.get("stages", {}).items():
        walk(name, stage.get("metrics", {}))
    return to_jsonable(flat)


__all__ = [
    "PROMPTS",
    "SCALES",
    "Reproduction",
    "Scale",
    "default_twins",
    "headline",
    "load_metrics",
    "parse_override",
    "reproduce",
    "resolve_scale",
]
