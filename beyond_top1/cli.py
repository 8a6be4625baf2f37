"""The ``beyond-top1`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from beyond_top1.cli_args import (
    add_model_args,
    add_score_first_arg,
    add_text_args,
    load_model_from_args,
    read_lens_arg,
    texts_from_args,
)
from beyond_top1.data import resolve_max_len
from beyond_top1.fileio import OutputError, OutputFolder, write_new_file


def _cmd_lens(args: argparse.Namespace) -> int:
    from beyond_top1.readout import format_top_tokens, top_tokens

    if args.csv and Path(args.csv).exists():  # before any work
        raise OutputError(f"{args.csv} exists; remove it or choose another file name")
    model = load_model_from_args(args)
    lens = read_lens_arg(model, args.lens)
    frame = top_tokens(model, args.prompt, lens=lens, k=args.k, position=args.position)
    print(f"# {lens.kind} lens on {args.model}: top-{args.k} next tokens, position {args.position}")
    print(format_top_tokens(frame))
    if args.csv:
        write_new_file(args.csv, lambda tmp: frame.to_csv(tmp, index=False))
    return 0


def _cmd_fit_lens(args: argparse.Namespace) -> int:
    from beyond_top1.lenses import LinearShortcutLens, check_lens_destination
    from beyond_top1.lenses.tuned import train_tuned_lens

    check_lens_destination(args.out)  # before the fit, not after it
    model = load_model_from_args(args)
    texts = texts_from_args(args)
    start = time.perf_counter()
    if args.kind == "linear":
        lens = LinearShortcutLens.fit(
            model,
            texts,
            bias=args.bias,
            ridge=args.ridge,
            batch_size=args.batch_size,
            max_len=args.max_len,
            score_first=args.score_first_token,
        )
    else:
        overrides = {"max_steps": args.max_steps, "lr": args.lr, "seed": args.seed}
        overrides["score_first"] = args.score_first_token
        if args.time_limit is not None:
            overrides["time_limit_s"] = args.time_limit
            overrides["clock"] = args.clock
        lens, _ = train_tuned_lens(
            model,
            texts,
            init=args.init,
            batch_size=args.batch_size,
            max_len=resolve_max_len(model, args.max_len),
            **overrides,
        )
    seconds = time.perf_counter() - start
    lens.save(args.out)  # with the tuned lens' training_history.csv
    print(f"fitted a {args.kind} lens on {len(texts)} texts in {seconds:.0f} s -> {args.out}")
    return 0


def _cmd_eval_lens(args: argparse.Namespace) -> int:
    from beyond_top1.lenses import LogitLens

    folder = OutputFolder(args.out, "eval-lens")  # checked before any work
    model = load_model_from_args(args)
    lenses = {} if args.no_logit else {"logit": LogitLens(model)}
    for directory in args.lens or []:
        lens = read_lens_arg(model, directory)
        name = lens.kind if lens.kind not in lenses else Path(directory).name
        lenses[name] = lens
    texts = texts_from_args(args)
    with folder as out:
        return _eval_lens(args, model, lenses, texts, out)


def _eval_lens(args, model, lenses, texts, out: OutputFolder) -> int:
    from beyond_top1.figures import plot_lens_metrics, plot_quality_of_fit, save_figure
    from beyond_top1.lenses.metrics import evaluate_lenses, quality_of_fit_matrix

    frame = evaluate_lenses(
        model,
        lenses,
        texts,
        batch_size=args.batch_size,
        max_len=args.max_len,
        score_first=args.score_first_token,
    )
    out.write_csv("lens_metrics.csv", frame)
    out.write_text("lens_metrics.json", frame.to_json(orient="records", indent=1))
    for metric, figure in plot_lens_metrics(frame).items():
        save_figure(figure, out.path / "figures" / metric)
    if args.quality_of_fit:
        from beyond_top1.data import wiki_texts

        fit_texts = wiki_texts(args.fit_texts, split="train", seed=args.seed)
        matrix = quality_of_fit_matrix(
            model,
            fit_texts,
            texts,
            batch_size=args.batch_size,
            max_len=args.max_len,
            score_first=args.score_first_token,
        )
        out.write_csv("quality_of_fit.csv", matrix)
        save_figure(plot_quality_of_fit(matrix), out.path / "figures" / "quality_of_fit")
    summary = frame.pivot(index="layer", columns="lens", values=["kl", "precision_at_1"])
    print(summary.round(3).to_string())
    print(f"wrote {out.path}/lens_metrics.csv, .json and figures/")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from beyond_top1.models import OFFLINE_MODELS, known_model_names

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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyond-top1",
        description="Lenses, top-k saturation events, task probes and early exit.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

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
    lens.set_defaults(run=_cmd_lens)

    fit = commands.add_parser("fit-lens", help="fit a linear-shortcut or tuned lens and save it")
    fit.add_argument("--kind", choices=["linear", "tuned"], required=True)
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

    from beyond_top1 import (
        commands_early_exit,
        commands_probes,
        commands_reproduce,
        commands_scan,
    )

    commands_scan.add_parser(commands)
    commands_probes.add_parser(commands)
    commands_early_exit.add_parser(commands)
    commands_reproduce.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Mistakes and faults end with one line on stderr, never a traceback:
    exit 2 for an error, 130 for Ctrl-C (with what was kept and how to continue)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        print(f"beyond-top1 {args.command}: interrupted. {hint or ''}".rstrip(), file=sys.stderr)
        return 130
    except OSError as exc:  # FileNotFoundError, PermissionError, a full disk, ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"beyond-top1 {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        print(f"beyond-top1 {args.command}: error: {exc}", file=sys.stderr)
        return 2
