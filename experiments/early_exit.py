"""Token-level early exit on the default model (papers 001 and 004; issue 6).

Part 1, simulation (no compute skipped): one pass over validation texts records every criterion's
per-layer signal; writes the curves (``curves.csv``), the layers-saved table
(``layers_saved.csv``), 001's better-LM test (``better_lm.json``) and the figure
(``figures/early_exit.png/.svg``).

Part 2, the real early-exit decoder: greedy decoding that stops at the exit layer (skipped layers'
K/V from the copied exit state), timed against full greedy decoding with the same code
(``generation.csv``, ``generation_per_prompt.csv``). The criterion's θ defaults to the
simulation's best θ reaching ``--gen-target`` Precision@1 for that criterion and lens.

    nice -n 10 python experiments/early_exit.py --linear-lens /work/runs/early_exit/linear200 \\
        --out /work/runs/early_exit/sim
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import beyond_top1 as bt
from beyond_top1.commands_early_exit import make_criterion, prompts_from_texts, read_probe
from beyond_top1.early_exit import (
    best_at_budget,
    better_language_modeling,
    collect_exit_signals,
    early_exit_curves,
    layers_saved_table,
    load_exit_signals,
    simulate_exit,
    with_probe,
)
from beyond_top1.figures import plot_early_exit_curves, save_figure
from beyond_top1.generation import benchmark_early_exit


def parse_args() -> argparse.Namespace:
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
    p.add_argument("--m", type=int, default=6, help="better-LM: early means s_2 <= L-1-m")
    p.add_argument(
        "--reuse-signals",
        action="store_true",
        help="reuse OUT/signals (same --n-texts/--max-len/--batch-size); the probe's are redone",
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
    return p.parse_args()


def train_probe(model, args: argparse.Namespace, folder: Path):
    """001's task probe on *train* texts (the simulation uses validation texts): a scan
    (k = --probe-k, logit lens), balanced rows from every layer, StandardScaler + one-vs-rest
    logistic regression."""
    texts = bt.wiki_texts(args.probe_texts, split="train", seed=args.seed)
    start = time.perf_counter()
    scan = bt.scan(
        model,
        texts,
        k=args.probe_k,
        batch_size=args.batch_size,
        max_len=args.max_len,
        precision=args.precision,
    )
    data = bt.task_dataset(
        model,
        scan,
        texts,
        k=args.probe_k,
        max_per_class=args.probe_max_per_class,
        seed=args.seed,
    )
    cv = bt.cross_validate_task_probe(data, n_splits=5, seed=args.seed)
    probe = bt.TaskProbe().fit(data)
    probe.save(folder / "probe.safetensors")
    info = {
        "texts": f"wiki_texts({args.probe_texts}, split='train', seed={args.seed})",
        "dataset": data.summary(),
        "cv": cv.summary(),
        "train_accuracy": float(probe.score(data)),
        "seconds": time.perf_counter() - start,
    }
    (folder / "probe.json").write_text(json.dumps(info, indent=1, default=str))
    return probe, info


def parse_gen_spec(spec: str) -> tuple[str, str, float | None, int]:
    """``criterion:lens[:theta[:min_layer]]`` (empty theta: the table's θ at --gen-target)."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 4:
        raise SystemExit(f"--gen {spec!r}: use criterion:lens[:theta[:min_layer]]")
    theta = float(parts[2]) if len(parts) > 2 and parts[2] else None
    min_layer = int(parts[3]) if len(parts) > 3 else 0
    return parts[0], parts[1], theta, min_layer


def run_generation(model, lenses, probe, signals, table, args, out: Path) -> list[dict]:
    """The real decoder for every --gen spec, timed against full greedy decoding."""
    tag = f"theta_at_{round(100 * args.gen_target):d}"
    criteria, simulated = {}, {}
    for spec in args.gen or ["margin:linear"]:
        method, lens, theta, min_layer = parse_gen_spec(spec)
        if theta is None:
            row = table[(table.method == method) & (table.lens == lens)]
            theta = float(row[tag].iloc[0]) if len(row) else float("nan")
            if theta != theta:  # NaN: the target is not reached on the grid
                print(f"skipping {spec}: it does not reach {args.gen_target:.0%} Precision@1")
                continue
        name = f"{method}/{lens}/θ={theta:g}/min_layer={min_layer}"
        criterion = make_criterion(
            method, theta, min_layer=min_layer, probe=probe, n_avg=signals.mean_input_length()
        )
        criteria[name] = (criterion, lenses[lens])
        sim = simulate_exit(signals, method, lens, theta, min_layer=min_layer)
        simulated[name] = {
            "simulated_precision_at_1": sim.precision_at_1,
            "simulated_accuracy": sim.accuracy,
            "simulated_mean_layers": sim.mean_layers,
        }
    prompts = prompts_from_texts(
        bt.wiki_texts(args.gen_prompts, split="val", seed=args.seed + 1), args.gen_prompt_words
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.gen_threads)  # batch-1 decoding: small ops
    try:
        bench = benchmark_early_exit(model, prompts, criteria, max_new_tokens=args.gen_tokens)
    finally:
        torch.set_num_threads(threads)
    bench.per_prompt.to_csv(out / "generation_per_prompt.csv", index=False)
    frame = bench.summary()
    for key in ("simulated_precision_at_1", "simulated_accuracy", "simulated_mean_layers"):
        frame[key] = [simulated[name][key] for name in frame["criterion"]]
    frame["threads"] = args.gen_threads
    frame.to_csv(out / "generation.csv", index=False)
    print(bench)
    return frame.to_dict(orient="records")


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bt.load_model(args.model, seed=args.seed)
    lenses = {"logit": bt.LogitLens(model)}
    if args.linear_lens:
        lenses["linear"] = bt.load_lens(args.linear_lens, model)
    else:
        lenses["linear"] = bt.LinearShortcutLens.fit(
            model, bt.wiki_texts(200, split="train", seed=args.seed), max_len=128
        )
        lenses["linear"].save(out / "linear_lens")
    if args.tuned_lens:
        lenses["tuned"] = bt.load_lens(args.tuned_lens, model)
    summary: dict = {"args": vars(args)}
    probe_dir = f"probe_train{args.probe_texts}_k{args.probe_k}"
    if args.probe:
        probe = read_probe(args.probe, model)
    elif (out / probe_dir / "probe.safetensors").is_file():  # a finished step
        probe = bt.load_probe(out / probe_dir / "probe.safetensors", model)
        summary["probe"] = json.loads((out / probe_dir / "probe.json").read_text())
    elif args.probe_texts > 0:
        probe, summary["probe"] = train_probe(model, args, out / probe_dir)
    else:
        probe = None

    signals_dir = out / "signals"
    texts = bt.wiki_texts(args.n_texts, split="val", seed=args.seed)
    if args.reuse_signals and (signals_dir / "signals.npz").is_file():
        signals = load_exit_signals(signals_dir)  # lens signals; the probe's are recomputed
        if probe is not None:
            signals = with_probe(
                signals, model, texts, probe, batch_size=args.batch_size, max_len=args.max_len
            )
    else:
        start = time.perf_counter()
        signals = collect_exit_signals(
            model,
            texts,
            lenses,
            probe=probe,
            batch_size=args.batch_size,
            max_len=args.max_len,
            precision=args.precision,
        )
        summary["signals_seconds"] = time.perf_counter() - start
        signals.save(signals_dir)
    summary["positions"] = len(signals)
    curves = early_exit_curves(signals)
    table = layers_saved_table(curves)
    better = better_language_modeling(signals, m=args.m)
    curves.to_csv(out / "curves.csv", index=False)
    table.to_csv(out / "layers_saved.csv", index=False)
    (out / "better_lm.json").write_text(json.dumps(better.to_dict(), indent=1))
    save_figure(plot_early_exit_curves(curves), out / "figures" / "early_exit")
    summary["full_accuracy"] = float(curves.loc[curves.method == "full", "accuracy"].iloc[0])
    summary["better_lm"] = better.to_dict()
    print(f"# {len(signals)} positions; full-model accuracy {summary['full_accuracy']:.4f}")
    print(table.round(3).to_string(index=False))
    print(better.summary())
    if signals.probe_task is not None:
        for lens in signals.lenses:  # 001's probe rule against the curves at its compute
            point = curves[(curves.method == "probe") & (curves.lens == lens)].iloc[0]
            rivals = best_at_budget(curves, point.mean_layers)
            rivals = rivals[rivals.lens == lens]
            rivals.to_csv(out / f"probe_vs_baselines_{lens}.csv", index=False)
            summary[f"probe_vs_baselines_{lens}"] = {
                "probe": point.to_dict(),
                "best_at_same_layers": rivals.to_dict(orient="records"),
            }
            print(
                f"probe/{lens}: P@1 {point.precision_at_1:.3f}, acc {point.accuracy:.3f} at "
                f"{point.mean_layers:.2f} layers; best others at <= those layers:"
            )
            print(
                rivals[["method", "theta", "precision_at_1", "accuracy", "mean_layers"]]
                .round(3)
                .to_string(index=False)
            )

    if not args.skip_generation:
        summary["generation"] = run_generation(model, lenses, probe, signals, table, args, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
