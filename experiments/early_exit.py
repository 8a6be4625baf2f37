"""Token-level early exit on the default model (papers 001 and 004; issue 6).

Part 1, simulation (the early-exit task; no compute skipped): 001's task probe is fitted on
*train* texts (the probe task on a scan of its own), then one pass over validation texts records
every criterion's per-layer signal, from which come the θ curves, the layers-saved table and
001's better-LM test; the probe rule is set against the best other criteria at its compute.

Part 2, the real early-exit decoder (the generation task, once per ``--gen`` criterion): greedy
decoding that stops at the exit layer (skipped layers' K/V from the copied exit state), timed
against full greedy decoding with the same code. The criterion's θ defaults to the simulation's
best θ reaching ``--gen-target`` Precision@1 for that criterion and lens.

Writes to ``--out``:

    signals/, curves.csv, layers_saved.csv, better_lm.json, figures/early_exit.*
                                  the early-exit task's files
    probe_vs_baselines_{lens}.csv the probe rule against the best criteria at <= its layers
    probe_train{N}_k{k}/          the probe task's files (probe.safetensors, cv.json, cv_*.csv,
                                  rows_per_layer.csv, figures/) and its scan (scan/)
    linear_lens/                  the linear-shortcut lens, when fitted here
    generation_{method}_{lens}_{θ}/  the generation task's files per criterion:
                                  generation.csv, generation_per_prompt.csv, example.json
    generation_vs_simulation.csv  per criterion: the decoder's speed-up and agreement next to
                                  the simulation's Precision@1, accuracy and layers
    summary.json                  every step's headline

    nice -n 10 python experiments/early_exit.py --linear-lens /work/runs/early_exit/linear200 \\
        --out /work/runs/early_exit/sim
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from beyond_top1.early_exit import best_at_budget, load_exit_signals, simulate_exit
from beyond_top1.fileio import OutputFolder
from beyond_top1.lenses import lens_set
from beyond_top1.models import load_model
from beyond_top1.probes import load_probe, read_probe
from beyond_top1.tasks import TextSpec, early_exit, generation, lens_fit, probe
from beyond_top1.tasks import scan as scan_task


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-texts", type=int, default=60, help="validation texts (simulation)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--linear-lens", help="saved linear-shortcut lens (default: fit on 200 train)")
    p.add_argument("--tuned-lens", help="saved tuned lens (optional)")
    p.add_argument("--probe", help="task probe (.safetensors or pickle); default: train one")
    p.add_argument("--probe-texts", type=int, default=120, help="train texts for the probe")
    p.add_argument("--probe-k", type=int, default=3)
    p.add_argument("--probe-max-per-class", type=int, default=300)
    p.add_argument(
        "--m", type=int, help="better-LM: early means s_2 <= L-1-m (default: min(6, L-2))"
    )
    p.add_argument(
        "--reuse-signals",
        action="store_true",
        help="reuse the finished simulation in OUT (signals/ and its tables; same texts, "
        "lenses and probe) instead of running it again",
    )
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--gen-prompts", type=int, default=20)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--gen-prompt-words", type=int, default=24)
    p.add_argument(
        "--gen",
        action="append",
        help="criterion:lens[:theta[:min_layer]], repeatable (default margin:linear); theta "
        "defaults to the simulation's θ reaching --gen-target Precision@1",
    )
    p.add_argument("--gen-target", type=float, default=0.95)
    p.add_argument("--gen-threads", type=int, default=1, help="torch threads while decoding")
    return p.parse_args(argv)


def load_lenses(model, args, folder: OutputFolder) -> dict:
    linear = args.linear_lens
    if not linear:
        fit = TextSpec(split="train", stop=200, seed=args.seed)
        config = lens_fit.LensFitConfig("linear", fit, max_len=128)
        linear = lens_fit.run(model, config, folder.claim("linear_lens"))
    return lens_set(model, linear=linear, tuned=args.tuned_lens)


def train_probe(model, args, folder: OutputFolder) -> tuple[object, dict | None]:
    """001's task probe on *train* texts (the simulation uses validation texts): the probe task
    on a scan of its own (k = --probe-k, logit lens); reused when that folder is finished."""
    if args.probe:
        return read_probe(args.probe, model), {"file": args.probe}
    if args.probe_texts <= 0:
        return None, None
    target = folder.claim(f"probe_train{args.probe_texts}_k{args.probe_k}")
    if all((target / name).is_file() for name in (probe.PROBE_FILE, probe.CV_FILE)):  # finished
        return load_probe(target / probe.PROBE_FILE, model), probe.headline(probe.load(target))
    config = probe.ProbeConfig(
        n_tasks=args.probe_k, max_per_class=args.probe_max_per_class, seed=args.seed
    )
    with OutputFolder(target, probe.KIND) as sub:
        texts = TextSpec(split="train", stop=args.probe_texts, seed=args.seed)
        scan_config = scan_task.ScanConfig(
            texts,
            k=args.probe_k,
            precision=args.precision,
            max_len=args.max_len,
            batch_size=args.batch_size,
        )
        scan = scan_task.run(model, scan_config, sub.claim("scan"), resume=True)
        outcome = probe.run(model, config, sub, scan)
    print(probe.describe(outcome))
    return outcome.probe, probe.headline(outcome)


def simulate(model, args, folder: OutputFolder, lenses, task_probe):
    """The early-exit task (or, with --reuse-signals, its finished files) and its signals."""
    signals_dir = folder.path / early_exit.SIGNALS_DIR
    if args.reuse_signals and (folder.path / early_exit.CURVES_FILE).is_file():
        signals = load_exit_signals(signals_dir)
        if task_probe is not None and signals.probe_task is None:
            print("note: the reused signals have no probe; run without --reuse-signals")
        return early_exit.load(folder.path), signals
    config = early_exit.EarlyExitConfig(
        texts=TextSpec(split="val", stop=args.n_texts, seed=args.seed),
        max_len=args.max_len,
        batch_size=args.batch_size,
        precision=args.precision,
        better_lm_m=args.m,
    )
    outcome = early_exit.run(model, config, folder, lenses, probe=task_probe)
    return outcome, outcome.signals


def probe_vs_baselines(curves: pd.DataFrame, lenses, folder: OutputFolder) -> dict:
    """001's probe rule against the best other criteria at no more layers, per lens."""
    out = {}
    for lens in lenses:
        point = curves[(curves.method == "probe") & (curves.lens == lens)].iloc[0]
        rivals = best_at_budget(curves, point.mean_layers)
        rivals = rivals[rivals.lens == lens]
        folder.write_csv(f"probe_vs_baselines_{lens}.csv", rivals)
        out[lens] = {"probe": point.to_dict(), "best_at_same_layers": rivals.to_dict("records")}
        print(
            f"probe/{lens}: P@1 {point.precision_at_1:.3f}, acc {point.accuracy:.3f} at "
            f"{point.mean_layers:.2f} layers; best others at <= those layers:"
        )
        shown = ["method", "theta", "precision_at_1", "accuracy", "mean_layers"]
        print(rivals[shown].round(3).to_string(index=False))
    return out


def parse_gen_spec(spec: str) -> tuple[str, str, float | None, int]:
    """``criterion:lens[:theta[:min_layer]]`` (empty theta: the table's θ at --gen-target)."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 4:
        raise SystemExit(f"--gen {spec!r}: use criterion:lens[:theta[:min_layer]]")
    theta = float(parts[2]) if len(parts) > 2 and parts[2] else None
    min_layer = int(parts[3]) if len(parts) > 3 else 0
    return parts[0], parts[1], theta, min_layer


def run_generation(model, lenses, task_probe, signals, table, args, folder) -> list[dict]:
    """The generation task for every --gen criterion, next to its simulated metrics."""
    tag = f"theta_at_{round(100 * args.gen_target):d}"
    texts = TextSpec(split="val", stop=args.gen_prompts, seed=args.seed + 1).load()
    prompts = tuple(generation.prompts_from_texts(texts, args.gen_prompt_words))
    rows = []
    for spec in args.gen or ["margin:linear"]:
        method, lens, theta, min_layer = parse_gen_spec(spec)
        if theta is None:
            row = table[(table.method == method) & (table.lens == lens)]
            theta = float(row[tag].iloc[0]) if tag in row and len(row) else math.nan
            if math.isnan(theta):  # the target is not reached on the grid
                print(f"skipping {spec}: it does not reach {args.gen_target:.0%} Precision@1")
                continue
        config = generation.GenerationConfig(
            prompts,
            criterion=method,
            theta=theta,
            lens=lens,
            min_layer=min_layer,
            n_avg=signals.mean_input_length(),
            new_tokens=args.gen_tokens,
            threads=args.gen_threads,
        )
        target = folder.claim(f"generation_{method}_{lens}_{theta:g}")
        bench = generation.run(model, config, target, lenses, probe=task_probe)
        print(bench)
        sim = simulate_exit(signals, method, lens, theta, min_layer=min_layer)
        rows.append(
            {
                "criterion": generation.describe_criterion(method, theta, lens),
                "min_layer": min_layer,
                **generation.headline(bench),
                "simulated_precision_at_1": sim.precision_at_1,
                "simulated_accuracy": sim.accuracy,
                "simulated_mean_layers": sim.mean_layers,
                "threads": args.gen_threads,
            }
        )
    folder.write_csv("generation_vs_simulation.csv", pd.DataFrame(rows))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = OutputFolder(args.out, early_exit.KIND)  # checked before any work
    summary: dict = {"args": vars(args)}
    with folder:
        model = load_model(args.model, seed=args.seed)
        lenses = load_lenses(model, args, folder)
        task_probe, summary["probe"] = train_probe(model, args, folder)
        outcome, signals = simulate(model, args, folder, lenses, task_probe)
        summary["simulation"] = early_exit.headline(outcome)
        print(f"# {outcome.n_positions} positions; full-model accuracy {outcome.full_accuracy:.4f}")
        print(early_exit.describe(outcome))
        if signals.probe_task is not None:
            summary["probe_vs_baselines"] = probe_vs_baselines(
                outcome.curves, signals.lenses, folder
            )
        if not args.skip_generation:
            summary["generation"] = run_generation(
                model, lenses, task_probe, signals, outcome.layers_saved, args, folder
            )
        folder.write_json("summary.json", summary)
    print(f"wrote {folder.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
