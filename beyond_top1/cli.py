"""The ``beyond-top1`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from beyond_top1.models import DEFAULT_MODEL


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="init seed for untrained models")


def _cmd_lens(args: argparse.Namespace) -> int:
    from beyond_top1.lenses import LogitLens
    from beyond_top1.models import load_model
    from beyond_top1.readout import format_top_tokens, top_tokens

    model = load_model(args.model, device=args.device, seed=args.seed)
    lens = LogitLens(model)
    frame = top_tokens(model, args.prompt, lens=lens, k=args.k, position=args.position)
    print(
        f"# {lens.kind} lens on {args.model}: top-{args.k} next tokens at position {args.position}"
    )
    print(format_top_tokens(frame))
    if args.csv:
        frame.to_csv(args.csv, index=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beyond-top1",
        description="Lenses, top-k saturation events, task probes and early exit.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    lens = commands.add_parser("lens", help="read a prompt layer by layer through a lens")
    lens.add_argument("prompt", help="the text to read")
    _add_model_args(lens)
    lens.add_argument("--k", type=int, default=5, help="tokens per layer (default: %(default)s)")
    lens.add_argument("--position", type=int, default=-1, help="token position (default: last)")
    lens.add_argument("--csv", help="also write the table as tidy CSV to this path")
    lens.set_defaults(run=_cmd_lens)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args)
    except (ValueError, IndexError, RuntimeError, FileNotFoundError) as exc:
        print(f"beyond-top1 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
