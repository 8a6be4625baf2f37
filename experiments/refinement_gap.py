"""Refinement gap vs. evidence position (paper 003) on the default model.

The refinement task: for a seeded multi-document probe set (key-value retrieval by default, see
``beyond_top1.refinement``), answer every prompt and, for each correctly answered one, find the
first layer where the answer is top-1 under the lens, the layer from which it stays top-1 (s_1)
and their gap; tabulate accuracy and gap per number of documents N and relevant position.

    PYTHONPATH=. nice -n 10 python experiments/refinement_gap.py --out /work/runs/refine/gap

Writes the task's files: ``questions.jsonl`` (the probe set; the same options give the same
questions, and ``--questions`` reuses a saved one), ``answers.csv`` (one row per prompt and
lens), ``refinement.csv`` (lens × N × position) and ``figures/refinement_<lens>.{png,svg}``;
and ``refinement_where.csv`` (lens × N × first/middle/last), ``summary.json`` and, when fitted
here, ``linear_lens/``.
"""

from __future__ import annotations

import argparse
import time

from beyond_top1.fileio import OutputFolder
from beyond_top1.lenses import lens_set
from beyond_top1.models import load_model
from beyond_top1.refinement import refinement_table
from beyond_top1.runtime import threads
from beyond_top1.tasks import TextSpec, lens_fit, refinement

COLUMNS = ["lens", "n_docs", "position", "n_prompts", "n_correct", "accuracy", "first_mean"]
COLUMNS += ["s1_mean", "gap_mean", "gap_se", "frac_gap_positive"]


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
    parser.add_argument(
        "--questions", help="a questions.jsonl of an earlier run, to reuse its prompts"
    )
    parser.add_argument("--linear-lens", help="a saved linear-shortcut lens (else fit one)")
    parser.add_argument("--fit-texts", type=int, default=200, help="train texts (0: no linear)")
    parser.add_argument("--tuned-lens", help="a saved tuned lens to add (optional)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    return args


def load_lenses(model, args, folder: OutputFolder, timings: dict) -> dict:
    linear = args.linear_lens
    if not linear and args.fit_texts:
        start = time.perf_counter()
        texts = TextSpec(split="train", stop=args.fit_texts, seed=args.seed)
        config = lens_fit.LensFitConfig("linear", texts, batch_size=args.batch_size)
        linear = lens_fit.run(model, config, folder.claim("linear_lens"))
        timings["fit_linear_s"] = round(time.perf_counter() - start, 1)
    return lens_set(model, linear=linear, tuned=args.tuned_lens)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = OutputFolder(args.out, refinement.KIND)  # checked before any work
    config = refinement.RefinementConfig(
        n_items=args.n_items,
        n_docs=tuple(args.n_docs),
        positions=None if args.positions == "all" else int(args.positions),
        task=args.task,
        split=args.split,
        questions=args.questions,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    start, timings = time.perf_counter(), {}
    with threads(args.threads), folder:
        model = load_model(args.model)
        lenses = load_lenses(model, args, folder, timings)
        t0 = time.perf_counter()
        answers = refinement.run(model, config, folder, lenses)
        timings["read_s"] = round(time.perf_counter() - t0, 1)
        by_where = refinement_table(answers, by=("n_docs", "where"))
        folder.write_csv("refinement_where.csv", by_where)
        timings["total_s"] = round(time.perf_counter() - start, 1)
        first = answers[answers["lens"] == "logit"]
        summary = {
            "model": args.model,
            "task": args.task,
            **refinement.headline(answers),
            "n_correct": int(first["correct"].sum()),
            "closed_book_accuracy": float(first["closed_book_correct"].mean()),
            "lenses": list(lenses),
            "args": vars(args),
            "timings": timings,
        }
        folder.write_json("summary.json", summary)
    _, table = refinement.load(folder.path)
    print(table[COLUMNS].round(3).to_string(index=False))
    print(by_where.round(3).to_string(index=False))
    print(timings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
