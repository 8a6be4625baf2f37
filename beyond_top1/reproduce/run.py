"""Running a reproduction: the output folder, the stages of the graph, ``metrics.json`` and
``report.html``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from beyond_top1 import hooked
from beyond_top1.fileio import OutputFolder, check_output_dir, to_jsonable
from beyond_top1.report import environment
from beyond_top1.reproduce.graph import PROMPTS, Graph, ModelRef, default_twins
from beyond_top1.reproduce.report import METRICS_FILE, REPORT_FILE, STAGES_DIR, build_report
from beyond_top1.reproduce.scale import Scale, resolve_scale
from beyond_top1.stages import StageRecord, Stages


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
    main = ModelRef(label, model, device=device, seed=seed)
    if twins is None:
        twins = default_twins(label) if isinstance(model, str) else []
    if isinstance(twins, Mapping):
        twin_models = [ModelRef(str(k), v, device=device, seed=seed) for k, v in twins.items()]
    else:
        twin_models = [ModelRef(str(t), t, device=device, seed=seed) for t in dict.fromkeys(twins)]
    if label in {t.label for t in twin_models}:
        raise ValueError(f"twin {label!r} is the model itself; name other models as twins")
    stages = Stages(out / STAGES_DIR, force=force, log=say)
    graph = Graph(scale, seed, progress, main, twin_models)
    planned = [step.name for step in graph.steps()]
    unknown = sorted(set(force) - set(planned))
    if unknown:
        raise ValueError(
            f"--force {', '.join(unknown)}: no such stage at this scale; the stages are "
            f"{', '.join(planned)}"
        )
    say(
        f"reproduce: {label} (twins: {', '.join(t.label for t in twin_models) or 'none'}), "
        f"scale {scale.name!r} -> {out}"
    )
    with OutputFolder(out, "reproduce", adopt=_legacy_run_files(out)) as folder:  # one writer
        folder.claim(STAGES_DIR)  # stage folders are emptied when their settings change
        graph.run(stages)
        seconds = time.perf_counter() - start
        return _write_outputs(folder, scale, stages, label, twin_models, seed, device, seconds, say)


def _legacy_run_files(out: Path) -> tuple[str, ...]:
    """A run folder written before folders kept a record of their files: ``metrics.json`` of
    this pipeline makes its files ours."""
    try:
        metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    ours = isinstance(metrics, dict) and {"stages", "scale", "environment"} <= set(metrics)
    return (STAGES_DIR, METRICS_FILE, REPORT_FILE) if ours else ()


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
    env = environment()
    metrics = {
        "model": label,
        "scale": scale.name,
        "settings": settings,
        "environment": env,
        "seconds_this_run": round(seconds, 1),
        "stages": {name: rec.to_json() for name, rec in stages.records.items()},
    }
    metrics_path = folder.write_json(METRICS_FILE, metrics)
    report = build_report(out, stages.records, settings, env, seconds)
    report_path = folder.write_text(REPORT_FILE, report.html())
    say(f"wrote {report_path} and {metrics_path} ({seconds:.0f} s this run)")
    return Reproduction(
        out, scale, dict(stages.records), report_path, metrics_path, seconds, settings
    )


def load_metrics(out: str | Path) -> dict:
    """``out/metrics.json`` of a finished :func:`reproduce` run."""
    return json.loads((Path(out) / METRICS_FILE).read_text(encoding="utf-8"))


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


__all__ = ["Reproduction", "headline", "load_metrics", "reproduce"]
