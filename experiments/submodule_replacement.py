"""Linear replacement of single sub-modules (paper 004 §6) on the default model.

The replacement task: fits least-squares affine maps input -> output for the attention, MLP and
normalisation (ln1) sub-module of every block on train texts (one streamed pass), then runs the
model with one sub-module at a time replaced and scores Precision@1 against the unmodified
model's top-1 and KL(p_orig ‖ p_replaced) on held-out texts, against the zero (drop the output)
and identity (pass the input through) baselines.

    PYTHONPATH=. nice -n 10 python experiments/submodule_replacement.py --out /work/runs/refine/rep

Writes the task's ``replacement.csv`` (layer × kind × variant) and
``figures/submodule_replacement.{png,svg}``, and ``summary.csv`` (mean over layers) and
``summary.json`` (the task's headline, the evaluation tokens, timings).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from beyond_top1.fileio import OutputFolder
from beyond_top1.lenses.least_squares import DEFAULT_RIDGE
from beyond_top1.models import load_model
from beyond_top1.replacement import DEFAULT_KINDS, DEFAULT_VARIANTS, replacement_summary
from beyond_top1.runtime import threads
from beyond_top1.tasks import TextSpec, replacement


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--kinds", nargs="+", default=list(DEFAULT_KINDS), help="sub-modules to replace"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="replacements to score"
    )
    parser.add_argument("--layers", type=int, nargs="+", help="blocks (default: every one)")
    parser.add_argument("--fit-texts", type=int, default=64, help="train texts for the maps")
    parser.add_argument("--fit-max-len", type=int, default=128, help="tokens per fitting text")
    parser.add_argument("--eval-texts", type=int, default=6, help="validation texts")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per evaluation text")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="relative ridge")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = OutputFolder(args.out, replacement.KIND)  # checked before any work
    config = replacement.ReplacementConfig(
        fit_texts=TextSpec(split="train", stop=args.fit_texts, seed=args.seed),
        eval_texts=TextSpec(split="val", stop=args.eval_texts, seed=args.seed),
        fit_max_len=args.fit_max_len,
        eval_max_len=args.max_len,
        batch_size=args.batch_size,
        layers=None if args.layers is None else tuple(args.layers),
        kinds=tuple(args.kinds),
        variants=tuple(args.variants),
        ridge=args.ridge,
    )
    start = time.perf_counter()
    with threads(args.threads), folder:
        model = load_model(args.model)
        frame = replacement.run(model, config, folder)
        summary = replacement_summary(frame)
        folder.write_csv("summary.csv", summary, index=True)
        info = {
            "model": args.model,
            "config": dataclasses.asdict(config),
            "fit_texts": config.fit_texts.describe(),
            "eval_texts": config.eval_texts.describe(),
            "headline": replacement.headline(frame),
            "n_eval_tokens": int(frame["n_tokens"].iloc[0]),
            "ce_orig": float(frame["ce_orig"].iloc[0]),
            "args": vars(args),
            "timings": {"total_s": round(time.perf_counter() - start, 1)},
        }
        folder.write_json("summary.json", info)
    wide = frame.pivot_table(
        index="layer", columns=["kind", "variant"], values=["precision_at_1", "kl"]
    )
    print(wide.round(3).to_string())
    print(summary.round(4).to_string())
    print(info["timings"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
