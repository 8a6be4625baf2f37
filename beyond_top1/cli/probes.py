"""``beyond-top1 probe`` (fit and cross-validate a task probe) and ``beyond-top1 intervene``
(task-shift interventions), from a scan folder or from a scan they run themselves."""

from __future__ import annotations

import argparse
from pathlib import Path

from beyond_top1 import distributed
from beyond_top1.cli.args import (
    add_model_args,
    add_text_args,
    load_model_from_args,
    read_lens_arg,
    read_probe,
    text_spec_from_args,
    texts_from_args,
)
from beyond_top1.fileio import OutputFolder
from beyond_top1.lenses import load_lens
from beyond_top1.ranking import PRECISIONS
from beyond_top1.scans import load_scan
from beyond_top1.tasks import interventions, probe
from beyond_top1.tasks import scan as scan_task


def _scan_and_lens(args: argparse.Namespace, model, folder: OutputFolder):
    """The scan (``--scan``, or one run now into ``OUT/scan``, resumed or reused when it was
    made with these arguments) and its lens."""
    if args.scan:
        result = load_scan(args.scan)
        if result.texts is None:  # saved before scans kept their texts: the text arguments
            result.texts = texts_from_args(args)
        source = args.lens or result.settings.get("lens")
        if source in (None, "logit") or args.lens:
            return result, read_lens_arg(model, args.lens)
        return result, load_lens(source, model)
    lens = read_lens_arg(model, args.lens)
    config = scan_task.ScanConfig(
        texts=text_spec_from_args(args),
        lens=args.lens or "logit",
        k=args.scan_k,
        precision=args.precision,
        max_len=args.max_len,
        batch_size=args.batch_size,
    )
    # a scan folder inside this one (under torchrun rank 0 holds ``folder`` and records it)
    target = distributed.run_checked(
        lambda: folder.claim("scan") if folder is not None else Path(args.out) / "scan"
    )
    return scan_task.run(model, config, target, lens=lens, resume=True), lens


def _cmd_probe(args: argparse.Namespace) -> int:
    folder = OutputFolder(args.out, probe.KIND)  # checked before any work
    config = probe.ProbeConfig(
        n_tasks=args.n_tasks,
        min_layer=args.min_layer,
        max_per_class=args.max_per_class,
        features=args.features,
        folds=args.folds,
        C=args.C,
        shuffled=not args.no_shuffled,
        heldout=args.held_out,
        seed=args.seed,
    )
    model = load_model_from_args(args)
    where = distributed.ranks()  # under torchrun: rank 0 holds the folder, every rank computes
    with distributed.on_main(lambda: folder, where) as held:
        result, _ = _scan_and_lens(args, model, held)
        outcome = probe.run(model, config, held, result)
    if not where.is_main:
        return 0
    print(probe.describe(outcome))
    print(f"wrote {folder.path}/{probe.PROBE_FILE}, cv_*.csv, cv.json and figures/")
    return 0


def _cmd_intervene(args: argparse.Namespace) -> int:
    folder = OutputFolder(args.out, interventions.FOLDER_KIND)  # checked before any work
    config = interventions.InterventionsConfig(
        a=args.a,
        delta=args.delta,
        max_distance=args.max_distance,
        max_pairs=args.max_pairs,
        direction=args.direction,
        controls=not args.no_controls,
        runs_per_batch=args.runs_per_batch,
        engine=args.engine,
        seed=args.seed,
    )
    model = load_model_from_args(args)
    task_probe = read_probe(args.probe, model)
    with folder:
        result, lens = _scan_and_lens(args, model, folder)
        outcome = interventions.run(model, config, folder, result, lens=lens, probe=task_probe)
    print(interventions.describe(outcome))
    print(f"wrote {folder.path}/trials.csv, by_offset.csv, by_sign.csv, summary.json, figures/")
    return 0


def _add_scan_args(parser: argparse.ArgumentParser, *, k: int) -> None:
    parser.add_argument(
        "--scan",
        help="a scan folder (beyond-top1 scan --out DIR); it keeps its texts. Without it a scan "
        "of the text arguments is run and written to OUT/scan",
    )
    parser.add_argument("--lens", help="a saved lens folder (default: the scan's, or logit)")
    parser.add_argument(
        "--scan-k", type=int, default=k, help="ranks tracked when running the scan (%(default)s)"
    )
    parser.add_argument(
        "--precision", default="fp32", choices=list(PRECISIONS), help="lens readout precision"
    )
    parser.add_argument("--out", required=True, help="folder for the results")


def add_parsers(commands) -> None:
    """Add ``probe`` and ``intervene`` to the ``beyond-top1`` subcommands."""
    pr = commands.add_parser(
        "probe", help="fit a task-index probe and cross-validate it (grouped by text)"
    )
    add_model_args(pr)
    add_text_args(pr, n_texts=150, split="val")
    _add_scan_args(pr, k=5)
    pr.add_argument(
        "--n-tasks",
        "--k",
        dest="n_tasks",
        type=int,
        default=3,
        help="tasks 1..n (default: %(default)s; --k is the old name)",
    )
    pr.add_argument("--min-layer", type=int, default=0, help="first layer to take rows from")
    pr.add_argument("--max-per-class", type=int, default=300, help="rows per (layer, task) at most")
    pr.add_argument("--features", default="raw", choices=["raw", "rms"])
    pr.add_argument("--folds", type=int, default=5, help="GroupKFold splits by text")
    pr.add_argument("--C", type=float, default=1.0, help="inverse L2 strength")
    pr.add_argument("--no-shuffled", action="store_true", help="skip the shuffled baseline")
    pr.add_argument(
        "--held-out",
        action="store_true",
        help=f"also fit {probe.HELDOUT_PROBE_FILE} on the first half of the texts only (for "
        "interventions on the second half)",
    )
    pr.set_defaults(run=_cmd_probe)

    iv = commands.add_parser(
        "intervene", help="task-shift interventions: patch a source's state into a target"
    )
    add_model_args(iv)
    add_text_args(iv, n_texts=150, split="val")
    _add_scan_args(iv, k=1)
    iv.add_argument(
        "--probe",
        help="a probe file from `beyond-top1 probe` (optional); targets then come only from "
        "texts it was not fitted on",
    )
    iv.add_argument("--a", type=int, help="offsets d in [-a, a] (default: Δ // 2)")
    iv.add_argument("--delta", type=int, help="min s_1 gap (default: 10 for >= 24 layers)")
    iv.add_argument("--max-distance", type=int, default=30, help="max tokens between the pair")
    iv.add_argument("--max-pairs", type=int, default=200, help="pairs to use (seeded sample)")
    iv.add_argument(
        "--direction",
        default="forward",
        choices=["forward", "backward"],
        help="forward: the source comes before the target (default); backward: after it",
    )
    iv.add_argument(
        "--no-controls", action="store_true", help="skip the matched and random controls"
    )
    iv.add_argument(
        "--runs-per-batch",
        "--rows-per-batch",
        dest="runs_per_batch",
        type=int,
        default=32,
        help="patched runs per forward pass (--rows-per-batch is the old name)",
    )
    iv.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "cached", "full"],
        help="cached: run only the target token on the unpatched keys/values (TransformerLens "
        "3.9); full: re-run each text; auto (default): cached where supported",
    )
    iv.set_defaults(run=_cmd_intervene)
