"""Task-index probes and task-shift interventions (paper 001 §2.3, §3; docs/definitions.md).

One scan (k = max(--ks)) of validation Wikipedia texts, then for every k in --ks the probe task:
rows from the scan, cross-validated with GroupKFold by text against the shuffled-label baseline,
then fitted on every row. Then the interventions task at offsets d in [-a, a] on the validation
texts, forward pairs (source before the target) and, reported apart, backward pairs, each with
the matched-donor and random controls and the predicted task of a k = --probe-k probe fitted on
a second scan, of *train* texts (held out from every target). Writes under --out:

    scan/, scan_probe_fit/     the two scans (resumed or reused when present)
    probe_k{k}/                the probe task's files: probe.safetensors, cv.json, cv_folds.csv,
                               cv_per_class.csv, cv_per_layer.csv, rows_per_layer.csv,
                               figures/probe_per_layer.* (a finished folder is reused)
    probe_heldout/             the same for the k = --probe-k probe of the train texts (no
                               shuffled baseline; reused when present)
    interventions_{forward,backward}/  the interventions task's files: pairs.csv, trials.csv,
                               by_offset.csv, by_sign.csv, summary.json,
                               figures/intervention_success.*
    figures/                   probe_per_layer.* (every k), intervention_success.* (both
                               directions side by side)
    summary.json               every step's headline, with timings

Example (the numbers in experiments/README.md):

    nice -n 10 python experiments/probes_interventions.py --model smollm2-135m \
        --n-texts 120 --out /work/runs/probes/smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import time

from beyond_top1.figures import plot_intervention_success, plot_probe_per_layer
from beyond_top1.fileio import OutputFolder
from beyond_top1.models import load_model
from beyond_top1.probes import load_probe
from beyond_top1.runtime import threads
from beyond_top1.tasks import AnalysisUnavailable, TextSpec, interventions, probe
from beyond_top1.tasks import scan as scan_task
from beyond_top1.tasks.common import figure

KIND = "experiment-probes-interventions"
DIRECTIONS = ("forward", "backward")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-texts", type=int, default=120)
    p.add_argument("--n-probe-texts", type=int, default=120, help="train texts for the probe")
    p.add_argument("--split", default="val")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5], help="probe task counts")
    p.add_argument("--min-layer", type=int, default=0)
    p.add_argument("--max-per-class", type=int, default=300)
    p.add_argument("--features", default="raw", choices=["raw", "rms"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--probe-k", type=int, default=3, help="probe used in the interventions")
    p.add_argument("--a", type=int, help="offsets d in [-a, a] (default: delta // 2)")
    p.add_argument("--delta", type=int, help="default: 10 for >= 24 layers, scaled otherwise")
    p.add_argument("--max-distance", type=int, default=30)
    p.add_argument("--max-pairs", type=int, default=120)
    p.add_argument("--runs-per-batch", type=int, default=32)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on a shared 2-core machine)",
    )
    return p.parse_args(argv)


@contextlib.contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[f"{name}_s"] = round(time.perf_counter() - start, 1)


def run_scan(model, args, folder: OutputFolder, name: str, texts: TextSpec):
    """The scan task into ``OUT/name`` (resumed, or loaded when finished with these settings)."""
    config = scan_task.ScanConfig(
        texts=texts,
        k=max(*args.ks, args.probe_k),
        precision=args.precision,
        max_len=args.max_len,
        batch_size=args.batch_size,
    )
    return scan_task.run(model, config, folder.claim(name), resume=True)


def probe_config(args, n_tasks: int, *, shuffled: bool = True) -> probe.ProbeConfig:
    return probe.ProbeConfig(
        n_tasks=n_tasks,
        min_layer=args.min_layer,
        max_per_class=args.max_per_class,
        features=args.features,
        folds=args.folds,
        C=args.C,
        shuffled=shuffled,
        seed=args.seed,
    )


def finished_probe(target) -> bool:
    return (target / probe.CV_FILE).is_file() and (target / probe.PROBE_FILE).is_file()


def fit_probes(model, args, folder: OutputFolder, scan, summary: dict, timings: dict) -> dict:
    """The probe task for every k of --ks; returns ``{"k=..": per-layer CV}``."""
    per_layer = {}
    for k in args.ks:
        name = f"probe_k{k}"
        target = folder.claim(name)
        if finished_probe(target):  # a finished step
            result = probe.load(target)
            per_layer[f"k={k}"], summary[name] = result["per_layer"], probe.headline(result)
            print(f"k={k}: reusing {target}")
            continue
        try:
            with timed(timings, name):
                outcome = probe.run(model, probe_config(args, k), target, scan)
        except AnalysisUnavailable as exc:  # e.g. no layer where all k tasks occur
            summary[name] = {"unavailable": str(exc)}
            print(f"k={k}: no probe: {exc}", flush=True)
            continue
        per_layer[f"k={k}"], summary[name] = outcome.cv.per_layer, probe.headline(outcome)
        print(probe.describe(outcome), flush=True)
    return per_layer


def heldout_probe(model, args, folder: OutputFolder, summary: dict, timings: dict):
    """The probe behind the interventions' evidence: fitted on train texts, never on a
    target's (``None`` when those texts cannot give one)."""
    target = folder.claim("probe_heldout")
    if finished_probe(target):  # a finished step
        summary["probe_heldout"] = probe.headline(probe.load(target))
        return load_probe(target / probe.PROBE_FILE, model)
    with timed(timings, "probe_heldout"):
        texts = TextSpec(split="train", stop=args.n_probe_texts, seed=args.seed)
        fit_scan = run_scan(model, args, folder, "scan_probe_fit", texts)
        config = probe_config(args, args.probe_k, shuffled=False)
        try:
            outcome = probe.run(model, config, target, fit_scan)
        except AnalysisUnavailable as exc:
            summary["probe_heldout"] = {"unavailable": str(exc)}
            print(f"no held-out probe (interventions without probe columns): {exc}")
            return None
    summary["probe_heldout"] = probe.headline(outcome)
    return outcome.probe


def intervene(model, args, folder: OutputFolder, scan, heldout, summary, timings) -> dict:
    """The interventions task in both directions; returns ``{direction: by_offset}``."""
    by_offset = {}
    for direction in DIRECTIONS:
        name = f"interventions_{direction}"
        config = interventions.InterventionsConfig(
            a=args.a,
            delta=args.delta,
            max_distance=args.max_distance,
            max_pairs=args.max_pairs,
            direction=direction,
            runs_per_batch=args.runs_per_batch,
            seed=args.seed,
        )
        try:
            with timed(timings, name):
                result = interventions.run(model, config, folder.claim(name), scan, probe=heldout)
        except AnalysisUnavailable as exc:
            summary[name] = {"unavailable": str(exc)}
            print(f"{direction}: {exc}")
            continue
        summary[name] = interventions.headline(result)
        by_offset[direction] = result.by_offset()
        print(interventions.describe(result), flush=True)
    return by_offset


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = OutputFolder(args.out, KIND)  # checked before any work
    timings: dict[str, float] = {}
    summary: dict = {"args": vars(args)}
    with threads(args.threads), folder:
        model = load_model(args.model, seed=args.seed)
        texts = TextSpec(split=args.split, stop=args.n_texts, seed=args.seed)
        with timed(timings, "scan"):
            scan = run_scan(model, args, folder, "scan", texts)
        summary["scan"] = {"texts": texts.describe(), **scan_task.headline(scan)}
        per_layer = fit_probes(model, args, folder, scan, summary, timings)
        if per_layer:
            figure(folder, plot_probe_per_layer(per_layer, chance=None), "probe_per_layer")
        heldout = heldout_probe(model, args, folder, summary, timings)
        by_offset = intervene(model, args, folder, scan, heldout, summary, timings)
        if by_offset:
            figure(folder, plot_intervention_success(by_offset), "intervention_success")
        summary["timings"] = timings
        folder.write_json("summary.json", summary)
    print(timings)
    print(f"wrote {folder.path}")
    return summary


if __name__ == "__main__":
    main()
