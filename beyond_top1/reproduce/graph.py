"""The stages of a reproduction: one task each, with its typed config, the model it reads and
the stages whose outputs it reads (see :mod:`beyond_top1.reproduce`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from beyond_top1 import hooked
from beyond_top1.lenses import lens_set
from beyond_top1.models import OFFLINE_MODELS, load_model
from beyond_top1.probes import load_probe
from beyond_top1.reproduce.scale import Scale
from beyond_top1.scans import load_scan
from beyond_top1.stages import StageRecord, Stages
from beyond_top1.tasks import (
    early_exit,
    generation,
    interventions,
    lens_eval,
    lens_fit,
    ordering,
    probe,
    refinement,
    replacement,
    views,
)
from beyond_top1.tasks import scan as scan_task
from beyond_top1.tasks.common import AnalysisUnavailable
from beyond_top1.tasks.texts import TextSpec

LENS_DIR = "lens"  # a lens stage's lens, inside its stage folder
SCAN_DIR = "scan"  # a scan stage's scan, inside its stage folder

PROMPTS = (
    "The capital of France is Paris. The capital of Germany is",
    "The Eiffel Tower is in Paris, and the Colosseum is in",
)
GENERATION_PROMPT = "The history of the city begins in"


def default_twins(model_name: str) -> list[str]:
    """Untrained twins of a model name: its own architecture when it is an offline model, and
    GPT-2 small's."""
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


class ModelRef:
    """A model given by name (loaded on first use) or as a ``HookedTransformer``."""

    def __init__(self, label: str, source, *, device: str, seed: int):
        self.label = label
        self._source = source
        self._model = None if isinstance(source, str) else source
        self.device, self.seed = device, seed

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self._source, device=self.device, seed=self.seed)
        return self._model

    def identity(self) -> dict:
        """What ties a stage to this model: its name, seed and TransformerLens line (the
        ``untrained:`` weights depend on the line), plus the folder's files for a local model;
        or, for a model object, the weights' fingerprint."""
        if isinstance(self._source, str):
            from beyond_top1.bridge import transformer_lens_major
            from beyond_top1.models import folder_signature

            identity = {
                "model": self._source,
                "model_seed": self.seed,
                "transformer_lens_major": transformer_lens_major(),
            }
            signature = folder_signature(self._source)
            return identity | ({"model_files": signature} if signature else {})
        return {
            "model": self.label,
            "unembedding_fingerprint": hooked.unembedding_fingerprint(self._model),
        }


@dataclass
class Step:
    """One stage: its task's config, the model it reads, the stages it reads from, and the
    function that runs the task into the stage folder and returns its headline."""

    name: str
    config: object
    run: Callable[[Step, Path], dict]
    model: ModelRef | None = None
    after: tuple[str, ...] = ()
    describe: str = ""


class Graph:
    """The stages of one :func:`reproduce` run at one scale, in order, and how each reads the
    outputs of the stages before it."""

    def __init__(self, scale: Scale, seed: int, progress: bool, main: ModelRef, twins):
        self.scale, self.seed, self.progress = scale, seed, progress
        self.main, self.twins = main, list(twins)
        self.records: dict[str, StageRecord] = {}

    def texts(self, split: str, start: int, stop: int) -> TextSpec:
        return TextSpec(split=split, start=start, stop=stop, seed=self.seed)

    def steps(self) -> list[Step]:
        """Every stage at this scale, in the order they run (each after those it reads)."""
        return [
            *self._lens_steps(),
            *self._scan_steps(),
            *self._probe_steps(),
            *self._exit_steps(),
            *self._optional_steps(),
            Step(
                "views",
                views.ViewsConfig(PROMPTS),
                self._views,
                self.main,
                self._lens_stages(),
                "CircuitsVis views of 2 prompts",
            ),
        ]

    def _common(self) -> dict:
        return {"max_len": self.scale.max_len, "batch_size": self.scale.batch_size}

    def _lens_stages(self) -> tuple[str, ...]:
        return ("lens-linear", *(("lens-tuned",) if self.scale.tuned_lens else ()))

    def _lens_steps(self) -> list[Step]:
        s, main = self.scale, self.main
        linear = lens_fit.LensFitConfig(
            "linear", self.texts("train", 0, s.lens_fit_texts), **self._common()
        )
        steps = [
            Step(
                "lens-linear",
                linear,
                self._fit_lens,
                main,
                describe=f"least squares on {s.lens_fit_texts} train texts × ≤{s.max_len} tokens",
            )
        ]
        if s.tuned_lens:
            tuned = lens_fit.LensFitConfig(
                "tuned",
                self.texts("train", 0, s.tuned_texts),
                max_steps=s.tuned_steps,
                seed=self.seed,
                **self._common(),
            )
            describe = f"{s.tuned_steps} steps on {s.tuned_texts} train texts"
            steps.append(Step("lens-tuned", tuned, self._fit_lens, main, describe=describe))
        metrics = lens_eval.LensEvalConfig(
            self.texts("val", 0, s.lens_eval_texts), **self._common()
        )
        describe = f"{s.lens_eval_texts} val texts"
        steps.append(
            Step("lens-metrics", metrics, self._lens_metrics, main, self._lens_stages(), describe)
        )
        return steps

    def _scan_steps(self) -> list[Step]:
        s = self.scale
        config = scan_task.ScanConfig(
            self.texts("val", 0, s.scan_texts), k=s.k, precision=s.precision, **self._common()
        )
        # A model whose scan feeds only the ordering statistics needs only s: saturation-only.
        only_s = replace(config, keep="saturation")
        steps = [
            Step(
                f"scan-{slug(m.label)}",
                config if m is self.main or s.twin_analyses else only_s,
                self._scan,
                m,
                describe=f"{m.label}, {s.scan_texts} val texts × ≤{s.max_len} tokens, k={s.k}, "
                f"{s.precision}"
                + ("" if m is self.main or s.twin_analyses else ", saturation only"),
            )
            for m in [self.main, *self.twins]
        ]
        statistics = ordering.OrderingConfig(n_permutations=s.permutations, seed=self.seed)
        scans = tuple(step.name for step in steps)
        steps.append(Step("ordering", statistics, self._ordering, None, scans, "001's statistics"))
        return steps

    def _probe_steps(self) -> list[Step]:
        s = self.scale
        probed = [self.main, *(self.twins if s.twin_analyses else [])]
        fit = probe.ProbeConfig(
            n_tasks=s.probe_k,
            max_per_class=s.probe_max_per_class,
            folds=s.probe_folds,
            heldout=True,
            seed=self.seed,
        )
        steps = [
            Step(
                f"probe-{slug(m.label)}",
                fit,
                self._probe,
                m,
                (f"scan-{slug(m.label)}",),
                f"{m.label}, k={s.probe_k}, {s.probe_folds}-fold GroupKFold by text",
            )
            for m in probed
        ]
        patch = interventions.InterventionsConfig(  # targets: the held-out probe's other half
            a=s.intervention_a,
            max_pairs=s.intervention_pairs,
            targets_from=s.scan_texts // 2,
            seed=self.seed,
        )
        steps += [
            Step(
                "interventions" if m is self.main else f"interventions-{slug(m.label)}",
                patch,
                self._interventions,
                m,
                (f"scan-{slug(m.label)}", f"probe-{slug(m.label)}"),
                f"{m.label}, ≤{s.intervention_pairs} pairs",
            )
            for m in probed
        ]
        return steps

    def _exit_steps(self) -> list[Step]:
        s, main = self.scale, self.main
        texts = self.texts("val", s.scan_texts, s.scan_texts + s.exit_texts)  # after the scan's
        simulation = early_exit.EarlyExitConfig(texts, precision=s.precision, **self._common())
        decoding = generation.GenerationConfig(  # criterion and θ: the simulation's best
            self._generation_prompts(texts), new_tokens=s.generation_tokens, threads=1
        )
        return [
            Step(
                "early-exit",
                simulation,
                self._early_exit,
                main,
                (*self._lens_stages(), f"probe-{slug(main.label)}"),
                f"simulation on {s.exit_texts} val texts",
            ),
            Step(
                "generation",
                decoding,
                self._generation,
                main,
                (*self._lens_stages(), "early-exit"),
                f"{s.generation_prompts} prompt(s) × {s.generation_tokens} tokens",
            ),
        ]

    def _optional_steps(self) -> list[Step]:
        s, steps = self.scale, []
        if s.refinement_items:
            gap = refinement.RefinementConfig(n_items=s.refinement_items, seed=self.seed)
            describe = f"{s.refinement_items} items × N ∈ (5, 10, 20) × 5 positions"
            steps.append(
                Step("refinement", gap, self._refinement, self.main, ("lens-linear",), describe)
            )
        if s.replacement_fit_texts:
            maps = replacement.ReplacementConfig(
                self.texts("train", 0, s.replacement_fit_texts),
                self.texts("val", 0, s.replacement_eval_texts),
                fit_max_len=s.max_len,
            )
            describe = f"fit on {s.replacement_fit_texts} train texts"
            steps.append(Step("replacement", maps, self._replacement, self.main, (), describe))
        return steps

    def run(self, stages: Stages) -> None:
        """Every stage in order (each skipped when finished with the same settings)."""
        for step in self.steps():
            self.run_step(stages, step)

    def run_step(self, stages: Stages, step: Step) -> StageRecord:
        """One stage, reading the records of the stages before it from ``stages``."""
        self.records = stages.records
        return stages.run(
            step.name,
            step.config,
            lambda folder: step.run(step, folder),
            identity=step.model.identity() if step.model is not None else {},
            after=[self.records[name] for name in step.after if name in self.records],
            describe=step.describe,
        )

    # --- what each stage reads from the ones before it -------------------------------------

    def _ok(self, name: str) -> StageRecord | None:
        record = self.records.get(name)
        return record if record is not None and record.ok else None

    def _lenses(self, model) -> dict:
        folders = {}
        for name, kind in (("lens-linear", "linear"), ("lens-tuned", "tuned")):
            if (record := self._ok(name)) is not None:
                folders[kind] = record.directory / LENS_DIR
        return lens_set(model, **folders)

    def _scan_of(self, m: ModelRef):
        record = self._ok(f"scan-{slug(m.label)}")
        if record is None:
            raise AnalysisUnavailable(f"scan-{slug(m.label)} is unavailable")
        return load_scan(record.directory / SCAN_DIR)

    def _probe_of(self, m: ModelRef, file: str):
        record = self._ok(f"probe-{slug(m.label)}")
        return None if record is None else load_probe(record.directory / file, m.model)

    def _generation_prompts(self, exit_texts: TextSpec) -> tuple[str, ...]:
        n = self.scale.generation_prompts
        if n <= 1:
            return (GENERATION_PROMPT,)
        texts = exit_texts.load() or self.texts("val", 0, self.scale.scan_texts).load()
        return (GENERATION_PROMPT, *generation.prompts_from_texts(texts[: n - 1], 24))

    # --- the stages --------------------------------------------------------------------------

    def _fit_lens(self, step: Step, folder: Path) -> dict:
        lens = lens_fit.run(
            step.model.model, step.config, folder / LENS_DIR, progress=self.progress
        )
        return lens_fit.headline(lens)

    def _lens_metrics(self, step: Step, folder: Path) -> dict:
        model = step.model.model
        lenses = self._lenses(model)
        frame = lens_eval.run(model, step.config, folder, lenses, progress=self.progress)
        return lens_eval.headline(frame, hooked.n_layers(model))

    def _scan(self, step: Step, folder: Path) -> dict:
        target = folder / SCAN_DIR
        result = scan_task.run(step.model.model, step.config, target, progress=self.progress)
        return scan_task.headline(result, target)

    def _ordering(self, step: Step, folder: Path) -> dict:
        scans = {}
        for m in [self.main, *self.twins]:
            if (record := self._ok(f"scan-{slug(m.label)}")) is not None:
                scans[m.label] = load_scan(record.directory / SCAN_DIR)
        return ordering.headline(ordering.run(scans, step.config, folder))

    def _probe(self, step: Step, folder: Path) -> dict:
        result = self._scan_of(step.model)
        outcome = probe.run(step.model.model, step.config, folder, result, progress=self.progress)
        return probe.headline(outcome)

    def _interventions(self, step: Step, folder: Path) -> dict:
        m = step.model
        result = self._scan_of(m)
        heldout = self._probe_of(m, probe.HELDOUT_PROBE_FILE)  # never saw the target texts
        outcome = interventions.run(
            m.model, step.config, folder, result, probe=heldout, progress=self.progress
        )
        return interventions.headline(outcome)

    def _early_exit(self, step: Step, folder: Path) -> dict:
        model = step.model.model
        task_probe = self._probe_of(step.model, probe.PROBE_FILE)
        outcome = early_exit.run(
            model,
            step.config,
            folder,
            self._lenses(model),
            probe=task_probe,
            progress=self.progress,
        )
        return early_exit.headline(outcome)

    def _generation(self, step: Step, folder: Path) -> dict:
        model = step.model.model
        lenses = self._lenses(model)
        lens = "linear" if "linear" in lenses else "logit"
        record = self._ok("early-exit")
        table = record.metrics.get("layers_saved", []) if record is not None else []
        method, theta, source = generation.choose_criterion(table, lens)
        config = replace(step.config, criterion=method, theta=theta, lens=lens)
        bench = generation.run(model, config, folder, lenses)
        return {
            "criterion": generation.describe_criterion(method, theta, lens),
            "theta_source": source,
            **generation.headline(bench),
        }

    def _refinement(self, step: Step, folder: Path) -> dict:
        model = step.model.model
        lenses = {k: v for k, v in self._lenses(model).items() if k != "tuned"}
        answers = refinement.run(model, step.config, folder, lenses, progress=self.progress)
        return refinement.headline(answers)

    def _replacement(self, step: Step, folder: Path) -> dict:
        frame = replacement.run(step.model.model, step.config, folder, progress=self.progress)
        return replacement.headline(frame)

    def _views(self, step: Step, folder: Path) -> dict:
        model = step.model.model
        outcome = views.run(model, step.config, folder, self._lenses(model))
        return views.headline(outcome, step.config)


__all__ = ["GENERATION_PROMPT", "PROMPTS", "Graph", "ModelRef", "default_twins", "slug"]
