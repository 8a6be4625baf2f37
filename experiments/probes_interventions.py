"""Task-index probes and task-shift interventions (paper 001 §2.3, §3; docs/definitions.md).

One scan (k = max(--ks)) of validation Wikipedia texts, then for every k in --ks a task probe
cross-validated with GroupKFold by text against the shuffled-label baseline. Then the task-shift
interventions at offsets d in [-a, a] on the validation texts, forward pairs (source before the
target) and, reported apart, backward pairs, each with the matched-donor and random controls and
the predicted task of a k = --probe-k probe fitted on a second scan, of *train* texts (held out
from every target). Writes CSV/JSON and figures under --out:

    scan/, scan_probe_fit/     the two scans (reused when present, as are finished steps)
    probe_k{k}/                folds.csv, per_class.csv, per_layer.csv, counts.csv, cv.json,
                               probe.safetensors (fitted on all validation rows)
    probe_heldout.safetensors  the k = --probe-k probe fitted on the train texts
    interventions_{forward,backward}/  pairs.csv, trials.csv, by_offset.csv, by_sign.csv,
                               summary.json
    figures/                   probe_per_layer.png/.svg, intervention_success.png/.svg
    summary.json               everything above in one file, with timings

Example (the numbers in experiments/README.md):

    nice -n 10 python experiments/probes_interventions.py --model smollm2-135m \
        --n-texts 120 --out /work/runs/probes/smollm2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

import beyond_top1 as bt
from beyond_top1.figures import plot_intervention_success, plot_probe_per_layer, save_figure
from beyond_top1.interventions import intervene
from beyond_top1.probes import TaskProbe, cross_validate_task_probe, load_probe, task_dataset


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
    p.add_argument("--ks", type=int, nargs="+", default=[3, 5])
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
    p.add_argument("--rows-per-batch", type=int, default=32)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest on a shared 2-core machine)",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    model = bt.load_model(args.model, seed=args.seed)
    texts = bt.wiki_texts(args.n_texts, split=args.split, seed=args.seed)

    def scan_of(folder: Path, texts: list[str], description: str):
        if (folder / "summary.json").exists():
            return bt.load_scan(folder)
        return bt.scan(
            model,
            texts,
            k=max(args.ks),
            batch_size=args.batch_size,
            max_len=args.max_len,
            precision=args.precision,
            out=folder,
            resume=True,
            texts_description=description,
        )

    scan = scan_of(
        out / "scan", texts, f"wiki_texts({args.n_texts}, split={args.split!r}, seed={args.seed})"
    )
    timings["scan_s"] = round(time.perf_counter() - clock, 1)
    summary: dict = {"args": vars(args), "scan": repr(scan), "n_positions": len(scan)}

    probes, per_layer = {}, {}
    for k in args.ks:
        clock = time.perf_counter()
        folder = out / f"probe_k{k}"
        if (folder / "cv.json").exists() and (folder / "probe.safetensors").exists():
            probes[k] = load_probe(folder / "probe.safetensors", model)  # a finished step
            entry = json.loads((folder / "cv.json").read_text())
            per_layer[f"k={k}"] = pd.DataFrame(entry["per_layer"])
            summary[f"probe_k{k}"] = entry
            continue
        try:
            data = task_dataset(
                model,
                scan,
                texts,
                k=k,
                min_layer=args.min_layer,
                max_per_class=args.max_per_class,
                features=args.features,
                seed=args.seed,
            )
            cv = cross_validate_task_probe(data, n_splits=args.folds, seed=args.seed, C=args.C)
        except ValueError as exc:  # e.g. no layer where all k tasks occur
            summary[f"probe_k{k}"] = {"error": str(exc)}
            print(f"k={k}: no probe: {exc}", flush=True)
            continue
        folder.mkdir(exist_ok=True)
        cv.folds.to_csv(folder / "folds.csv", index=False)
        cv.per_class.to_csv(folder / "per_class.csv", index=False)
        cv.per_layer.to_csv(folder / "per_layer.csv", index=False)
        data.counts().to_csv(folder / "counts.csv")
        data.available.to_csv(folder / "available.csv", index=False)
        probe = TaskProbe(C=args.C).fit(data)
        probe.save(folder / "probe.safetensors")
        probes[k], per_layer[f"k={k}"] = probe, cv.per_layer
        entry = {"dataset": data.summary(), "cv": cv.summary()}
        entry["per_class"] = cv.per_class.to_dict(orient="records")
        entry["per_layer"] = cv.per_layer.to_dict(orient="records")
        (folder / "cv.json").write_text(json.dumps(entry, indent=1) + "\n")
        summary[f"probe_k{k}"] = entry
        timings[f"probe_k{k}_s"] = round(time.perf_counter() - clock, 1)
        s = entry["cv"]
        print(
            f"k={k}: balanced accuracy {s['balanced_accuracy_mean']:.3f} ± "
            f"{s['balanced_accuracy_se']:.3f}, shuffled {s['shuffled_balanced_accuracy_mean']:.3f}"
            f" ± {s['shuffled_balanced_accuracy_se']:.3f} ({s['n_rows']} rows, "
            f"{s['n_texts']} texts)",
            flush=True,
        )
    save_figure(plot_probe_per_layer(per_layer, chance=None), out / "figures" / "probe_per_layer")

    # The probe behind the interventions' evidence: fitted on train texts, never on a target's.
    clock = time.perf_counter()
    heldout_path = out / "probe_heldout.safetensors"
    if heldout_path.exists():
        heldout = load_probe(heldout_path, model)
    else:
        fit_texts = bt.wiki_texts(args.n_probe_texts, split="train", seed=args.seed)
        fit_scan = scan_of(
            out / "scan_probe_fit",
            fit_texts,
            f"wiki_texts({args.n_probe_texts}, split='train', seed={args.seed})",
        )
        data = task_dataset(
            model,
            fit_scan,
            fit_texts,
            k=args.probe_k,
            min_layer=args.min_layer,
            max_per_class=args.max_per_class,
            features=args.features,
            seed=args.seed,
        )
        heldout = TaskProbe(C=args.C).fit(data)
        heldout.save(heldout_path)
        summary["probe_heldout"] = data.summary()
    timings["probe_heldout_s"] = round(time.perf_counter() - clock, 1)

    by_offset = {}
    cols = ["d", "n", "success_rate", "success_se", "strict_rate", "matched_n"]
    cols += ["matched_success_rate", "effect_vs_matched", "effect_vs_matched_se", "random_n"]
    cols += ["random_success_rate", "probe_n", "probe_moved_1_to_2", "matched_probe_moved_1_to_2"]
    for direction in ("forward", "backward"):
        clock = time.perf_counter()
        result = intervene(
            model,
            scan,
            texts,
            a=args.a,
            delta=args.delta,
            max_distance=args.max_distance,
            max_pairs=args.max_pairs,
            direction=direction,
            probe=heldout,
            batch_size=args.rows_per_batch,
            seed=args.seed,
        )
        result.save(out / f"interventions_{direction}")
        timings[f"interventions_{direction}_s"] = round(time.perf_counter() - clock, 1)
        summary[f"interventions_{direction}"] = result.summary()
        summary[f"interventions_{direction}_by_offset"] = result.by_offset().to_dict(
            orient="records"
        )
        by_offset[direction] = result.by_offset()
        present = [c for c in cols if c in by_offset[direction].columns]
        print(f"{direction}: {len(result.pairs)} pairs")
        print(by_offset[direction][present].round(3).to_string(index=False))
        sign = result.by_sign()
        print(sign[["offsets", *present[1:]]].round(3).to_string(index=False))
    save_figure(plot_intervention_success(by_offset), out / "figures" / "intervention_success")
    summary["timings"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps(timings))
    return summary


if __name__ == "__main__":
    main()
