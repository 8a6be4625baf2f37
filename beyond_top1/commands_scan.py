"""``beyond-top1 scan`` and ``beyond-top1 order``: saturation scans from the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from beyond_top1.cli_args import (
    add_model_args,
    add_score_first_arg,
    add_text_args,
    load_model_from_args,
    read_lens_arg,
    texts_from_args,
    texts_source,
)
from beyond_top1.fileio import check_output_dir, write_new_file
from beyond_top1.saturation import ORDERING_LABELS


def add_parser(commands) -> None:

    scan = commands.add_parser(
        "scan",
        help="rank trajectories and saturation layers over texts (resumable)",
        description="Stream texts through a model and a lens and write saturation.parquet "
        "(one row per position), trajectories.safetensors and summary.json to --out.",
    )
    add_model_args(scan)
    add_text_args(scan, n_texts=200, split="val")
    add_score_first_arg(scan)
    scan.add_argument("--k", type=int, default=5, help="ranks to track (default: %(default)s)")
    scan.add_argument("--lens", default="logit", help="'logit' or a saved lens folder")
    scan.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="which GEMM proposes candidates; the exact rule gives the same top-k ids, "
        "ranks within k and saturation layers either way (default: %(default)s)",
    )
    scan.add_argument("--out", required=True, help="output folder")
    scan.add_argument("--resume", action="store_true", help="continue an interrupted run")
    scan.add_argument("--permutations", type=int, default=1000, help="null permutations")
    scan.set_defaults(run=_cmd_scan)

    order = commands.add_parser(
        "order", help="ordering statistics of one or more scans, side by side"
    )
    order.add_argument("scans", nargs="+", help="scan folders (written by `beyond-top1 scan`)")
    order.add_argument("--csv", help="also write the table to this CSV file")
    order.set_defaults(run=_cmd_order)


def _cmd_scan(args: argparse.Namespace) -> int:
    from beyond_top1.scans import SETTINGS_FILE, ScanFileError, scan

    out = check_output_dir(args.out)  # before loading anything
    if (out / SETTINGS_FILE).is_file() and not args.resume:
        raise ScanFileError(
            f"{out} already holds a scan; add --resume to continue or reuse it, or choose a "
            "new --out"
        )
    finished = (out / "summary.json").is_file()
    command = " ".join(shlex.quote(a) for a in ["beyond-top1", *sys.argv[1:]])
    resume = command if args.resume else f"{command} --resume"
    args.on_interrupt = f"Finished shards are kept in {out / 'shards'}; continue with: {resume}"
    model = load_model_from_args(args)
    lens = read_lens_arg(model, args.lens)
    texts = texts_from_args(args)
    source = texts_source(args, len(texts))
    result = scan(
        model,
        texts,
        lens=lens,
        k=args.k,
        batch_size=args.batch_size,
        max_len=args.max_len,
        precision=args.precision,
        out=args.out,
        resume=args.resume,
        lens_source=args.lens,
        texts_description=source,
        n_permutations=args.permutations,
        score_first=args.score_first_token,
    )
    summary = json.loads((out / "summary.json").read_text())
    if finished:
        print(f"{out} holds this scan, complete: {len(result)} positions of {len(texts)} texts")
    else:
        timing = json.loads((out / "timing.json").read_text())
        print(f"scanned {len(result)} positions of {len(texts)} texts -> {out}")
        print(f"  {timing['tokens_per_second']} tokens/s this run ({timing['seconds']} s)")
    if "ordering" in summary:
        print(_format_table({args.out: summary["ordering"]}))
    return 0


def _format_table(columns: dict[str, dict]) -> str:
    import pandas as pd

    table = pd.DataFrame(
        {name: [stats.get(key) for key in ORDERING_LABELS] for name, stats in columns.items()},
        index=list(ORDERING_LABELS.values()),
    )
    return table.to_string(float_format=lambda x: f"{x:.4g}")


def _cmd_order(args: argparse.Namespace) -> int:
    import pandas as pd

    from beyond_top1.scans import SUMMARY_FILE, ScanFileError

    columns = {}
    for folder in args.scans:
        path = Path(folder) / SUMMARY_FILE
        if not path.is_file():
            raise ScanFileError(f"{folder} has no {SUMMARY_FILE}: is it a finished scan folder?")
        summary = json.loads(path.read_text())
        if "ordering" not in summary:
            raise ScanFileError(f"{folder}: no ordering statistics (k < 3 or no positions)")
        settings = summary.get("settings", {})
        name = f"{settings.get('model_name', folder)} [{settings.get('lens', '?')}]"
        if name in columns:
            name = f"{name} {folder}"
        columns[name] = summary["ordering"]
    print(_format_table(columns))
    if args.csv:
        frame = pd.DataFrame({name: stats for name, stats in columns.items()})
        write_new_file(args.csv, lambda tmp: frame.to_csv(tmp))
    return 0
