"""``beyond-top1 reproduce``: every analysis as a cached stage, then report.html + metrics.json."""

from __future__ import annotations

import argparse

from beyond_top1.models import DEFAULT_MODEL
from beyond_top1.reproduce import SCALES, parse_override, reproduce
from beyond_top1.runtime import resolve_threads, threads


def _cmd_reproduce(args: argparse.Namespace) -> int:
    count, why = resolve_threads(args.threads)
    if why and why != "set":
        print(f"torch threads: {count} ({why}; --threads N to set)")
    overrides = dict(parse_override(item) for item in args.set)
    with threads(count):
        result = reproduce(
            args.model,
            args.out,
            scale=args.scale,
            overrides=overrides,
            twins=[] if args.no_twins else args.twin,
            seed=args.seed,
            device=args.device,
            force=args.force,
            progress=not args.quiet,
        )
    print(result.summary().to_string(index=False))
    return 0


def add_parsers(commands) -> None:
    parser = commands.add_parser(
        "reproduce",
        help="run every analysis (cached, resumable) and write report.html + metrics.json",
        description="Lenses, scans and ordering of the model and its untrained twins, task "
        "probes, interventions, early exit (and, at paper scale, the refinement gap and "
        "sub-module replacement), each a cached stage under OUT/stages; then OUT/report.html "
        "(self-contained, offline) and OUT/metrics.json. Rerunning skips finished stages.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument(
        "--scale",
        default="quick",
        choices=list(SCALES),
        help="quick: under 10 min on 2 CPU cores; paper: the papers' scale (hours); "
        "test: seconds, numbers meaningless (default: %(default)s)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--twin",
        action="append",
        help="an untrained twin to scan (repeatable; default: untrained:<model> when it exists, "
        "and untrained:gpt2-small)",
    )
    parser.add_argument("--no-twins", action="store_true", help="scan only the model")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scale setting, e.g. --set scan_texts=32 --set tuned_lens=true",
    )
    parser.add_argument("--force", action="append", default=[], help="rerun this stage")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads, or 'auto' (default): one thread per core other work leaves "
        "free when the CPUs are busy (1-minute load average >= 1), where torch's threads "
        "would wait on each other and run several times slower; torch's default otherwise",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_cmd_reproduce)
