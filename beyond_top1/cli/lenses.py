"""``beyond-top1 models``, ``lens``, ``fit-lens`` and ``eval-lens``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from beyond_top1 import distributed
from beyond_top1.cli.args import (
    add_model_args,
    add_score_first_arg,
    add_text_args,
    load_model_from_args,
    read_lens_arg,
    text_spec_from_args,
)
from beyond_top1.fileio import OutputError, OutputFolder, write_new_file
from beyond_top1.lenses import LogitLens, check_lens_destination
from beyond_top1.models import OFFLINE_MODELS, known_model_names
from beyond_top1.prompt import top_tokens, top_tokens_table, trajectory
from beyond_top1.tasks import lens_eval, lens_fit
from beyond_top1.tasks.texts import TextSpec
from beyond_top1.viz import heatmap


def _cmd_models(args: argparse.Namespace) -> int:
    print("offline (no network needed):")
    for name in OFFLINE_MODELS:
        print(f"  {name}")
    if args.all:
        hub = [name for name in known_model_names() if name not in OFFLINE_MODELS]
        print(f"TransformerLens names and aliases (need the Hugging Face hub), {len(hub)}:")
        for name in hub:
            print(f"  {name}")
    else:
        print("add --all for the models TransformerLens loads from the Hugging Face hub")
    from beyond_top1.bridge import transformer_lens_major

    if transformer_lens_major() >= 4:
        print("also: any Hugging Face causal LM, as 'org/name' or a local save_pretrained folder")
    return 0


def _cmd_lens(args: argparse.Namespace) -> int:
    for path in (args.csv, args.targets_csv, args.html):
        if path and Path(path).exists():  # before any work
            raise OutputError(f"{path} exists; remove it or choose another file name")
    if args.targets_csv and not (args.target or args.target_id):
        raise OutputError("--targets-csv needs at least one --target or --target-id")
    model = load_model_from_args(args)
    lens = read_lens_arg(model, args.lens)
    frame = top_tokens(model, args.prompt, lens=lens, k=args.k, position=args.position)
    print(f"# {lens.kind} lens on {args.model}: top-{args.k} next tokens, position {args.position}")
    print(top_tokens_table(frame).to_string())
    if args.csv:
        write_new_file(args.csv, lambda tmp: frame.to_csv(tmp, index=False))
    if args.target or args.target_id or args.html:
        targets = [*args.target, *args.target_id] or None
        traj = trajectory(model, args.prompt, lens=lens, k=args.k, targets=targets)
        if targets:
            frame = traj.targets
            rows = frame[frame["pos"] == traj.position(args.position)]
            cells = [f"{r} ({p:.3f})" for r, p in zip(rows["rank"], rows["prob"], strict=True)]
            table = rows.assign(cell=cells)
            print(f"# rank (probability) of each target at position {args.position}")
            print(table.pivot(index="layer", columns="target", values="cell").to_string())
        if args.targets_csv:
            write_new_file(args.targets_csv, lambda tmp: traj.targets.to_csv(tmp, index=False))
        if args.html:
            stat = f"rank: {traj.target_labels[0]}" if targets else "prob"
            heatmap(traj, stat=stat).save(args.html)
            print(f"wrote {args.html}")
    return 0


def _cmd_fit_lens(args: argparse.Namespace) -> int:
    check_lens_destination(args.out)  # before the fit, not after it
    config = lens_fit.LensFitConfig(
        kind=args.kind,
        texts=text_spec_from_args(args),
        max_len=args.max_len,
        batch_size=args.batch_size,
        score_first=args.score_first_token,
        ridge=args.ridge,
        bias=args.bias,
        init=args.init,
        max_steps=args.max_steps,
        lr=args.lr,
        time_limit_s=args.time_limit,
        clock=args.clock,
        seed=args.seed,
    )
    model = load_model_from_args(args)
    start = time.perf_counter()
    lens = lens_fit.run(model, config, args.out)
    seconds = time.perf_counter() - start
    if not distributed.ranks().is_main:
        return 0
    print(f"fitted a {args.kind} lens ({lens_fit.headline(lens)}) in {seconds:.0f} s -> {args.out}")
    return 0


def _cmd_eval_lens(args: argparse.Namespace) -> int:
    folder = OutputFolder(args.out, lens_eval.KIND)  # checked before any work
    quality = TextSpec(split="train", stop=args.fit_texts, seed=args.seed)
    config = lens_eval.LensEvalConfig(
        texts=text_spec_from_args(args),
        max_len=args.max_len,
        batch_size=args.batch_size,
        score_first=args.score_first_token,
        quality_of_fit_texts=quality if args.quality_of_fit else None,
    )
    model = load_model_from_args(args)
    lenses = {} if args.no_logit else {"logit": LogitLens(model)}
    for directory in args.lens or []:
        lens = read_lens_arg(model, directory)
        lenses[lens.kind if lens.kind not in lenses else Path(directory).name] = lens
    if not lenses:
        raise ValueError("no lens to evaluate: give --lens DIR, or drop --no-logit")
    frame = lens_eval.run(model, config, folder.path, lenses)  # locks the folder (rank 0)
    if not distributed.ranks().is_main:
        return 0
    summary = frame.pivot(index="layer", columns="lens", values=["kl", "precision_at_1"])
    print(summary.round(3).to_string())
    print(f"wrote {folder.path}/{lens_eval.METRICS_FILE}, .json and figures/")
    return 0


def add_parsers(commands) -> None:
    models = commands.add_parser("models", help="list the model names --model accepts")
    models.add_argument("--all", action="store_true", help="also the hub models (long)")
    models.set_defaults(run=_cmd_models)

    lens = commands.add_parser("lens", help="read a prompt layer by layer through a lens")
    lens.add_argument("prompt", help="the text to read")
    add_model_args(lens)
    lens.add_argument("--lens", help="a saved lens folder (default: the logit lens)")
    lens.add_argument("--k", type=int, default=5, help="tokens per layer (default: %(default)s)")
    lens.add_argument("--position", type=int, default=-1, help="token position (default: last)")
    lens.add_argument("--csv", help="also write the table as tidy CSV to this path")
    lens.add_argument(
        "--target",
        action="append",
        default=[],
        help="a token to follow across layers: a string that is one token (' Rome', with its "
        "space; 'next' = the actual next token); repeat for several",
    )
    lens.add_argument(
        "--target-id", action="append", type=int, default=[], help="a token id to follow"
    )
    lens.add_argument("--targets-csv", help="write the targets' ranks at every layer and position")
    lens.add_argument("--html", help="write the layer × position heatmap (offline HTML) here")
    lens.set_defaults(run=_cmd_lens)

    fit = commands.add_parser("fit-lens", help="fit a linear-shortcut or tuned lens and save it")
    fit.add_argument("--kind", choices=list(lens_fit.KINDS), required=True)
    fit.add_argument("--out", required=True, help="folder to write the lens to")
    add_model_args(fit)
    add_text_args(fit, n_texts=500, split="train")
    add_score_first_arg(fit)
    fit.add_argument("--ridge", type=float, default=1e-4, help="linear: relative ridge term")
    fit.add_argument("--bias", action="store_true", help="linear: fit a bias too")
    fit.add_argument("--init", default="linear", choices=["linear", "zero"], help="tuned: init")
    fit.add_argument("--max-steps", type=int, default=60, help="tuned: training steps")
    fit.add_argument("--lr", type=float, default=4e-3, help="tuned: Adam lr per unit residual RMS")
    fit.add_argument("--time-limit", type=float, help="tuned: stop after this many seconds")
    fit.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="tuned: what --time-limit counts; cpu = CPU seconds per torch thread, i.e. idle-"
        "machine wall time (default: %(default)s)",
    )
    fit.set_defaults(run=_cmd_fit_lens)

    ev = commands.add_parser("eval-lens", help="per-layer metrics of lenses on held-out texts")
    ev.add_argument("--lens", action="append", help="a saved lens folder (repeatable)")
    ev.add_argument("--no-logit", action="store_true", help="leave out the logit lens")
    ev.add_argument("--out", required=True, help="folder for CSV/JSON and figures")
    ev.add_argument("--quality-of-fit", action="store_true", help="also the layer×layer r² map")
    ev.add_argument("--fit-texts", type=int, default=200, help="train texts for that map")
    add_model_args(ev)
    add_text_args(ev, n_texts=200, split="val")
    add_score_first_arg(ev)
    ev.set_defaults(run=_cmd_eval_lens)
