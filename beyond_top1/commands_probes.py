"""CLI: ``beyond-top1 probe`` (fit and cross-validate a task probe) and ``beyond-top1 intervene``
(task-shift interventions), from a scan folder or from a scan they run themselves."""

from __future__ import annotations

import argparse
from pathlib import Path

from beyond_top1.cli_args import (
    add_model_args,
    add_text_args,
    load_model_from_args,
    read_lens_arg,
    texts_from_args,
    texts_source,
)
from beyond_top1.data import resolve_max_len
from beyond_top1.fileio import OutputFolder


def _add_scan_args(parser: argparse.ArgumentParser, *, k: int) -> None:
    parser.add_argument(
        "--scan",
        help="a scan folder (bt.scan(..., out=DIR)); give the same model and text arguments it "
        "was made with. Without it a scan is run and written to OUT/scan",
    )
    parser.add_argument("--lens", help="a saved lens folder (default: the scan's, or logit)")
    parser.add_argument(
        "--scan-k", type=int, default=k, help="ranks tracked when running the scan (%(default)s)"
    )
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="lens readout precision"
    )
    parser.add_argument("--out", required=True, help="folder for the results")


def _scan_and_lens(args: argparse.Namespace, model, texts):
    from beyond_top1.lenses import load_lens
    from beyond_top1.scans import load_scan, scan

    if args.scan:
        result = load_scan(args.scan)
        source = args.lens or result.settings.get("lens")
        if source in (None, "logit") or args.lens:
            lens = read_lens_arg(model, args.lens)
        else:
            lens = load_lens(source, model)
        return result, lens
    lens = read_lens_arg(model, args.lens)
    folder = Path(args.out) / "scan"
    if (folder / "summary.json").exists():
        return _reused_scan(folder, args, lens, texts), lens
    description = texts_source(args, len(texts))
    result = scan(
        model,
        texts,
        lens=lens,
        k=args.scan_k,
        batch_size=args.batch_size,
        max_len=args.max_len,
        precision=args.precision,
        out=folder,
        resume=folder.exists(),
        lens_source=args.lens,
        texts_description=description,
    )
    return result, lens


def _reused_scan(folder: Path, args: argparse.Namespace, lens, texts):
    """The finished scan in ``folder``, if it was made with these arguments; else an error."""
    from beyond_top1.scans import ScanFileError, load_scan, texts_fingerprint

    result = load_scan(folder)
    made = result.settings or {}
    wanted = {
        "lens": args.lens or lens.kind,
        "k": args.scan_k,
        "precision": args.precision,
        "max_len": resolve_max_len(lens.model, args.max_len),
        "texts_sha256": texts_fingerprint(texts),
    }
    differ = [key for key, value in wanted.items() if made.get(key) != value]
    if differ:
        raise ScanFileError(
            f"{folder} holds a scan made with other settings ({', '.join(differ)} differ); "
            "delete it or choose another --out"
        )
    return result


def _cmd_probe(args: argparse.Namespace) -> int:
    folder = OutputFolder(args.out, "probe")  # checked before any work
    model = load_model_from_args(args)
    texts = texts_from_args(args)
    with folder:
        return _probe(args, model, texts, folder)


def _probe(args: argparse.Namespace, model, texts, out: OutputFolder) -> int:
    from beyond_top1.figures import plot_probe_per_layer, save_figure
    from beyond_top1.probes import TaskProbe, cross_validate_task_probe, task_dataset

    scan_result, _ = _scan_and_lens(args, model, texts)
    data = task_dataset(
        model,
        scan_result,
        texts,
        k=args.k,
        min_layer=args.min_layer,
        max_per_class=args.max_per_class,
        features=args.features,
        seed=args.seed,
    )
    cv = cross_validate_task_probe(
        data, n_splits=args.folds, seed=args.seed, C=args.C, shuffled=not args.no_shuffled
    )
    probe = TaskProbe(C=args.C).fit(data)
    probe.save(out.claim("probe.safetensors"))
    out.write_csv("cv_folds.csv", cv.folds)
    out.write_csv("cv_per_class.csv", cv.per_class)
    out.write_csv("cv_per_layer.csv", cv.per_layer)
    out.write_csv("rows_per_layer.csv", data.counts(), index=True)
    summary = {"dataset": data.summary(), "cv": cv.summary()}
    out.write_json("cv.json", summary)
    save_figure(
        plot_probe_per_layer(cv.per_layer, chance=1 / data.k),
        out.path / "figures" / "probe_per_layer",
    )
    s = summary["cv"]
    line = (
        f"task probe, k={data.k}: balanced accuracy {s['balanced_accuracy_mean']:.3f} ± "
        f"{s['balanced_accuracy_se']:.3f} (SE over {s['n_splits']} folds grouped by text)"
    )
    if not args.no_shuffled:
        line += (
            f"; shuffled labels {s['shuffled_balanced_accuracy_mean']:.3f} ± "
            f"{s['shuffled_balanced_accuracy_se']:.3f}"
        )
    print(line + f"; {s['n_rows']} rows from {s['n_texts']} texts, chance {1 / data.k:.3f}")
    print(f"wrote {out.path}/probe.safetensors, cv_*.csv, cv.json and figures/")
    return 0


def _cmd_intervene(args: argparse.Namespace) -> int:
    from beyond_top1.probes import load_probe

    folder = OutputFolder(args.out, "interventions")  # checked before any work
    model = load_model_from_args(args)
    texts = texts_from_args(args)
    probe = load_probe(args.probe, model) if args.probe else None
    with folder:
        scan_result, lens = _scan_and_lens(args, model, texts)
        return _intervene(args, model, texts, probe, scan_result, lens, folder)


def _intervene(args, model, texts, probe, scan_result, lens, out: OutputFolder) -> int:
    from beyond_top1.figures import plot_intervention_success, save_figure
    from beyond_top1.interventions import SUMMARY_COLUMNS, intervene

    result = intervene(
        model,
        scan_result,
        texts,
        lens=lens,
        a=args.a,
        delta=args.delta,
        max_distance=args.max_distance,
        max_pairs=args.max_pairs,
        direction=args.direction,
        controls=not args.no_controls,
        probe=probe,
        batch_size=args.rows_per_batch,
        engine=args.engine,
        seed=args.seed,
    )
    result.save(out)
    by_offset = result.by_offset()
    if len(by_offset):
        figure = plot_intervention_success(by_offset)
        save_figure(figure, out.path / "figures" / "intervention_success")
    present = [c for c in SUMMARY_COLUMNS if c in by_offset.columns]
    print(f"# {len(result.pairs)} {args.direction} pairs (Δ = {result.settings['delta']})")
    if len(by_offset):
        print(by_offset[["d", *present]].round(3).to_string(index=False))
        print(result.by_sign()[["offsets", *present]].round(3).to_string(index=False))
    print(f"wrote {out.path}/trials.csv, by_offset.csv, by_sign.csv, summary.json and figures/")
    return 0


def add_parser(commands) -> None:
    """Add ``probe`` and ``intervene`` to the ``beyond-top1`` subcommands."""

    probe = commands.add_parser(
        "probe", help="fit a task-index probe and cross-validate it (grouped by text)"
    )
    add_model_args(probe)
    add_text_args(probe, n_texts=150, split="val")
    _add_scan_args(probe, k=5)
    probe.add_argument("--k", type=int, default=3, help="tasks 1..k (default: %(default)s)")
    probe.add_argument("--min-layer", type=int, default=0, help="first layer to take rows from")
    probe.add_argument(
        "--max-per-class", type=int, default=300, help="rows per (layer, task) at most"
    )
    probe.add_argument("--features", default="raw", choices=["raw", "rms"])
    probe.add_argument("--folds", type=int, default=5, help="GroupKFold splits by text")
    probe.add_argument("--C", type=float, default=1.0, help="inverse L2 strength")
    probe.add_argument("--no-shuffled", action="store_true", help="skip the shuffled baseline")
    probe.set_defaults(run=_cmd_probe)

    iv = commands.add_parser(
        "intervene", help="task-shift interventions: patch a source's state into a target"
    )
    add_model_args(iv)
    add_text_args(iv, n_texts=150, split="val")
    _add_scan_args(iv, k=1)
    iv.add_argument("--probe", help="a probe file from `beyond-top1 probe` (optional)")
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
    iv.add_argument("--rows-per-batch", type=int, default=32, help="patched runs per pass")
    iv.add_argument("--engine", default="cached", choices=["cached", "full"])
    iv.set_defaults(run=_cmd_intervene)
