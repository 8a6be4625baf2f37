"""The ``beyond-top1`` command line: one module per group of subcommands, each a thin caller
of :mod:`beyond_top1.tasks`."""

from __future__ import annotations

import argparse
import os
import sys

from beyond_top1 import distributed
from beyond_top1.cli import early_exit, lenses, probes, reproduce, scan
from beyond_top1.tasks.common import AnalysisUnavailable

DATA_PARALLEL_COMMANDS = (
    "scan",
    "fit-lens",
    "eval-lens",
    "probe",
)  # the commands that shard texts under torchrun


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyond-top1",
        description="Lenses, top-k saturation events, task probes and early exit.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (lenses, scan, probes, early_exit, reproduce):
        group.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Mistakes and faults end with one line on stderr, never a traceback:
    exit 2 for an error, 130 for Ctrl-C (with what was kept and how to continue)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if distributed.launched():
            if args.command not in DATA_PARALLEL_COMMANDS:
                raise ValueError(
                    f"{args.command} does not run under torchrun yet (data-parallel: "
                    f"{', '.join(DATA_PARALLEL_COMMANDS)}); run it in one process"
                )
            distributed.ranks()  # the process group (and this rank's GPU) before any model
        return args.run(args)
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        print(f"beyond-top1 {args.command}: interrupted. {hint or ''}".rstrip(), file=sys.stderr)
        return 130
    except OSError as exc:  # FileNotFoundError, PermissionError, a full disk, ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"beyond-top1 {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except (AnalysisUnavailable, ValueError, TypeError, IndexError, RuntimeError) as exc:
        print(f"beyond-top1 {args.command}: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
