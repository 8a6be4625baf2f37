"""Refinement gap vs. evidence position (paper 003) on the default model.

For a seeded multi-document probe set (key-value retrieval by default, see
``beyond_top1.refinement``), answer every prompt and, for each correctly answered one, find the
first layer where the answer is top-1 under the lens, the layer from which it stays top-1 (s_1)
and their gap; tabulate accuracy and gap per number of documents N and relevant position.

    PYTHONPATH=. nice -n 10 python experiments/refinement_gap.py --out /work/runs/refine/gap

Writes ``questions.jsonl`` (the probe set; pass it back with ``--questions`` to rerun on the same
prompts), ``per_prompt.csv``, ``table.csv`` (lens × N × position), ``table_where.csv`` (lens × N ×
first/middle/last), ``summary.json`` and ``figures/refinement_gap_<lens>.{png,svg}``.
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
    parser.add_argument("--task", default="kv", choices=["kv", "cloze"])
    parser.add_argument("--n-docs", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--n-items", type=int, default=16, help="base items per N")
    parser.add_argument(
        "--positions", default="5", help="'all' or the number of evenly spaced positions"
    )
    parser.add_argument("--split", default="val", help="Wikipedia split of the documents")
    parser.add_argument("--questions", help="a questions.jsonl to reuse instead of generating")
    parser.add_argument("--linear-lens", help="a saved linear-shortcut lens (else fit one)")
    parser.add_argument("--fit-texts", type=int, default=200, help="train texts (0: no linear)")
    parser.add_argument("--tuned-lens", help="a saved tuned lens to add (optional)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import beyond_top1 as bt
    from beyond_top1.figures import plot_refinement_gap, save_figure
    from beyond_top1.refinement import (
        load_questions,
        make_questions,
        read_questions,
        refinement_table,
        save_questions,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = bt.load_model(args.model)
    if args.questions:
        questions = load_questions(args.questions)
    else:
        positions = None if args.positions == "all" else int(args.positions)
        questions = make_questions(
            model,
            n_docs=args.n_docs,
            n_items=args.n_items,
            positions=positions,
            task=args.task,
            split=args.split,
            seed=args.seed,
        )
    save_questions(questions, out / "questions.jsonl")
    lenses = {"logit": bt.LogitLens(model)}
    timings = {}
    if args.linear_lens:
        lenses["linear"] = bt.load_lens(args.linear_lens, model)
    elif args.fit_texts:
        t0 = time.perf_counter()
        texts = bt.wiki_texts(args.fit_texts, split="train", seed=args.seed)
        lenses["linear"] = bt.LinearShortcutLens.fit(
            model, texts, description=f"wiki_texts({args.fit_texts}, split='train')"
        )
        lenses["linear"].save(out / "linear_lens")
        timings["fit_linear_s"] = round(time.perf_counter() - t0, 1)
    if args.tuned_lens:
        lenses["tuned"] = bt.load_lens(args.tuned_lens, model)
    t0 = time.perf_counter()
    frame = read_questions(model, questions, lenses, batch_size=args.batch_size)
    timings["read_s"] = round(time.perf_counter() - t0, 1)
    frame.to_csv(out / "per_prompt.csv", index=False)
    table = refinement_table(frame)
    table.to_csv(out / "table.csv", index=False)
    by_where = refinement_table(frame, by=("n_docs", "where"))
    by_where.to_csv(out / "table_where.csv", index=False)
    for name in lenses:
        save_figure(
            plot_refinement_gap(table, lens=name), out / "figures" / f"refinement_gap_{name}"
        )
    timings["total_s"] = round(time.perf_counter() - start, 1)
    first = frame[frame["lens"] == "logit"]
    summary = {
        "model": args.model,
        "task": questions[0].task,
        "n_questions": len(questions),
        "n_correct": int(first["correct"].sum()),
        "accuracy": float(first["correct"].mean()),
        "closed_book_accuracy": float(first["closed_book_correct"].mean()),
        "lenses": list(lenses),
        "args": vars(args),
        "timings": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    columns = ["lens", "n_docs", "position", "n_prompts", "n_correct", "accuracy"]
    columns += ["first_mean", "s1_mean", "gap_mean", "gap_se", "frac_gap_positive"]
    print(table[columns].round(3).to_string(index=False))
    print(by_where.round(3).to_string(index=False))
    print(json.dumps(timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
