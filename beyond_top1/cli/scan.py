"""``beyond-top1 scan`` and ``beyond-top1 order``: saturation scans from the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pandas as pd

from beyond_top1 import distributed
from beyond_top1.cli.args import (
    add_model_args,
    add_score_first_arg,
    add_text_args,
    load_model_from_args,
    positive_int,
    read_lens_arg,
    text_spec_from_args,
)
from beyond_top1.fileio import OutputError, check_output_dir, write_new_file
from beyond_top1.ranking import PRECISIONS
from beyond_top1.saturation import DEFAULT_PERMUTATIONS
from beyond_top1.scans import SETTINGS_FILE, SUMMARY_FILE, ScanFileError, scan_ordering
from beyond_top1.tasks import ordering
from beyond_top1.tasks import scan as scan_task


def _cmd_scan(args: argparse.Namespace) -> int:
    where = distributed.ranks()  # under torchrun: rank 0 checks, every rank learns the answer

    def check_out():
        out = check_output_dir(args.out)  # before loading anything
        if (out / SETTINGS_FILE).is_file() and not args.resume:
            raise ScanFileError(
                f"{out} already holds a scan; add --resume to continue or reuse it, or choose "
                "a new --out"
            )
        return (out / SUMMARY_FILE).is_file()

    finished = distributed.broadcast(
        distributed.run_checked(lambda: check_out() if where.is_main else None, where), where
    )
    out = Path(args.out)
    command = " ".join(shlex.quote(a) for a in ["beyond-top1", *sys.argv[1:]])
    resume = command if args.resume else f"{command} --resume"
    args.on_interrupt = f"Finished shards are kept in {out / 'shards'}; continue with: {resume}"
    config = scan_task.ScanConfig(
        texts=text_spec_from_args(args),
        lens=args.lens,
        k=args.k,
        precision=args.precision,
        max_len=args.max_len,
        batch_size=args.batch_size,
        score_first=args.score_first_token,
        keep=args.keep,
        shard_batches=args.shard_batches,
    )
    model = load_model_from_args(args)
    lens = read_lens_arg(model, args.lens)
    result = scan_task.run(model, config, out, lens=lens, resume=args.resume)
    if not where.is_main:
        return 0
    if finished:
        print(f"{out} holds this scan, complete: {len(result)} positions")
    else:
        head = scan_task.headline(result, out)
        print(f"scanned {len(result)} positions of {config.texts.describe()} -> {out}")
        print(f"  {head.get('tokens_per_second')} tokens/s this run")
    if args.permutations and result.k >= 3 and len(result):
        stats = ordering.statistics(
            {args.out: result}, ordering.OrderingConfig(n_permutations=args.permutations)
        )
        print(ordering.format_table({name: st.summary() for name, st in stats.items()}))
    return 0


def _cmd_order(args: argparse.Namespace) -> int:
    """Reads each folder's ``saturation.parquet`` one row group at a time (bounded memory)."""
    if args.csv and Path(args.csv).exists():  # before any work
        raise OutputError(f"{args.csv} exists; remove it or choose another file name")
    folders = {}
    for folder in args.scans:
        try:
            summary = json.loads((Path(folder) / SUMMARY_FILE).read_text(encoding="utf-8"))
            settings = summary["settings"]
        except (OSError, ValueError, KeyError):
            raise ScanFileError(
                f"{folder} has no readable {SUMMARY_FILE}: is it a finished scan folder?"
            ) from None
        if settings.get("k", 0) < 3 or not summary.get("n_positions"):
            raise ScanFileError(f"{folder}: no ordering statistics (k < 3 or no positions)")
        name = f"{settings.get('model_name', folder)} [{settings.get('lens', '?')}]"
        folders[f"{name} {folder}" if name in folders else name] = folder
    summaries = {
        name: scan_ordering(folder, n_permutations=args.permutations, seed=args.seed).summary()
        for name, folder in folders.items()
    }
    print(ordering.format_table(summaries))
    if args.csv:
        frame = pd.DataFrame(summaries)
        write_new_file(args.csv, lambda tmp: frame.to_csv(tmp))
    return 0


def add_parsers(commands) -> None:
    scan = commands.add_parser(
        "scan",
        help="rank trajectories and saturation layers over texts (resumable)",
        description="Stream texts through a model and a lens and write saturation.parquet "
        "(one row per position), trajectories.safetensors, texts.jsonl and summary.json to "
        "--out; then print 001's ordering statistics.",
    )
    add_model_args(scan)
    add_text_args(scan, n_texts=200, split="val")
    add_score_first_arg(scan)
    scan.add_argument("--k", type=int, default=5, help="ranks to track (default: %(default)s)")
    scan.add_argument("--lens", default="logit", help="'logit' or a saved lens folder")
    scan.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="which GEMM proposes candidates; the exact rule gives the same top-k ids, "
        "ranks within k and saturation layers either way (default: %(default)s)",
    )
    scan.add_argument(
        "--keep",
        choices=["all", "saturation"],
        default="all",
        help="'saturation': only the final top-k and s_1..s_k (the same values), read from the "
        "last layer down, several times faster; no per-layer files (default: %(default)s)",
    )
    scan.add_argument(
        "--shard-batches",
        type=positive_int,
        default=4,
        help="batches per shard file: the unit kept by an interrupted run, and the unit of "
        "work each rank takes under torchrun (default: %(default)s)",
    )
    scan.add_argument("--out", required=True, help="output folder")
    scan.add_argument("--resume", action="store_true", help="continue an interrupted run")
    scan.add_argument(
        "--permutations",
        type=int,
        default=DEFAULT_PERMUTATIONS,
        help="permutations of the ordering nulls printed after the scan (0: no statistics)",
    )
    scan.set_defaults(run=_cmd_scan)

    order = commands.add_parser(
        "order", help="ordering statistics of one or more scans, side by side"
    )
    order.add_argument("scans", nargs="+", help="scan folders (written by `beyond-top1 scan`)")
    order.add_argument("--csv", help="also write the table to this CSV file")
    order.add_argument(
        "--permutations", type=int, default=DEFAULT_PERMUTATIONS, help="null permutations"
    )
    order.add_argument("--seed", type=int, default=0, help="permutation seed")
    order.set_defaults(run=_cmd_order)
