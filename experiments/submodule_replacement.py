"""Linear replacement of single sub-modules (paper 004 §6) on the default model.

Fits least-squares affine maps input -> output for the attention, MLP and normalisation (ln1)
sub-module of every block on train texts (one streamed pass), then runs the model with one
sub-module at a time replaced and scores Precision@1 against the unmodified model's top-1 and
KL(p_orig ‖ p_replaced) on held-out texts, against the zero (drop the output) and identity
(pass the input through) baselines.

    PYTHONPATH=. nice -n 10 python experiments/submodule_replacement.py --out /work/runs/refine/rep

Writes ``replacement.csv`` (layer × kind × variant), ``summary.csv`` (mean over layers),
``summary.json`` and ``figures/submodule_replacement.{png,svg}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kinds", nargs="+", default=["attn", "mlp", "norm"])
    parser.add_argument("--variants", nargs="+", default=["fit", "zero", "identity"])
    parser.add_argument("--layers", type=int, nargs="+", help="blocks to replace (default: all)")
    parser.add_argument("--fit-texts", type=int, default=64, help="train texts for the maps")
    parser.add_argument("--fit-max-len", type=int, default=128, help="tokens per fitting text")
    parser.add_argument("--eval-texts", type=int, default=6, help="validation texts")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per evaluation text")
    parser.add_argument("--ridge", type=float, default=1e-4, help="relative ridge")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import beyond_top1 as bt
    from beyond_top1.figures import plot_submodule_replacement, save_figure
    from beyond_top1.replacement import (
        evaluate_replacements,
        fit_submodule_maps,
        replacement_summary,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = bt.load_model(args.model)
    maps = fit_submodule_maps(
        model,
        bt.wiki_texts(args.fit_texts, split="train", seed=args.seed),
        layers=args.layers,
        kinds=args.kinds,
        ridge=args.ridge,
        batch_size=args.batch_size,
        max_len=args.fit_max_len,
    )
    fit_s = time.perf_counter() - start
    frame = evaluate_replacements(
        model,
        maps,
        bt.wiki_texts(args.eval_texts, split="val", seed=args.seed),
        variants=args.variants,
        batch_size=args.batch_size,
        max_len=args.max_len,
    )
    frame.to_csv(out / "replacement.csv", index=False)
    summary = replacement_summary(frame)
    summary.to_csv(out / "summary.csv")
    save_figure(plot_submodule_replacement(frame), out / "figures" / "submodule_replacement")
    total_s = time.perf_counter() - start
    info = {
        "model": args.model,
        "fit": maps.settings,
        "n_eval_tokens": int(frame["n_tokens"].iloc[0]),
        "ce_orig": float(frame["ce_orig"].iloc[0]),
        "args": vars(args),
        "timings": {"fit_s": round(fit_s, 1), "total_s": round(total_s, 1)},
    }
    (out / "summary.json").write_text(json.dumps(info, indent=1))
    wide = frame.pivot_table(
        index="layer", columns=["kind", "variant"], values=["precision_at_1", "kl"]
    )
    print(wide.round(3).to_string())
    print(summary.round(4).to_string())
    print(json.dumps(info["timings"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
