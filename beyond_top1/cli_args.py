"""Arguments and loaders shared by the ``beyond-top1`` subcommands.

Only ``argparse`` and the default model name are imported here: the heavy modules (models,
data, lenses) are imported inside the functions, so building the parser stays fast.
"""

from __future__ import annotations

import argparse

from beyond_top1.models import DEFAULT_MODEL


def positive_int(value: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--device`` and ``--seed`` to ``parser``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for untrained models, text order and training"
    )


def add_text_args(parser: argparse.ArgumentParser, *, n_texts: int, split: str) -> None:
    """Add the text-source and batching arguments (``--texts-file`` ... ``--batch-size``)."""
    parser.add_argument("--texts-file", help="your own texts: .txt (one per line) or .jsonl")
    parser.add_argument(
        "--n-texts",
        type=positive_int,
        default=None,
        help=f"Wikipedia texts (default: {n_texts}); with --texts-file, the first N of the file "
        "(default: all)",
    )
    parser.set_defaults(default_n_texts=n_texts)
    parser.add_argument(
        "--split", default=split, choices=["train", "val", "all"], help="(default: %(default)s)"
    )
    parser.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="tokens per text, truncated (default: 128, or the model's context if shorter)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")


def add_score_first_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--score-first-token`` (score position 0 of a model without BOS)."""
    parser.add_argument(
        "--score-first-token",
        action="store_true",
        help="also score position 0 of a model without BOS; by default it is left out, as the "
        "attention sink (see beyond_top1.data)",
    )


def texts_from_args(args: argparse.Namespace) -> list[str]:
    """The texts :func:`add_text_args` describes: ``--texts-file`` or Wikipedia texts."""
    from beyond_top1.data import load_texts, wiki_texts

    if args.texts_file:
        texts = load_texts(args.texts_file)
        return texts[: args.n_texts] if args.n_texts is not None else texts
    n_texts = args.n_texts if args.n_texts is not None else args.default_n_texts
    return wiki_texts(n_texts, split=args.split, seed=args.seed)


def texts_source(args: argparse.Namespace, n_texts: int) -> str:
    """A description of the texts :func:`texts_from_args` returned (``n_texts`` of them)."""
    if args.texts_file:
        return f"{args.texts_file} (first {n_texts})"
    return f"wiki_texts({n_texts}, split={args.split!r}, seed={args.seed})"


def load_model_from_args(args: argparse.Namespace):
    """The model :func:`add_model_args` describes (``--model``, ``--device``, ``--seed``)."""
    from beyond_top1.models import load_model

    return load_model(args.model, device=args.device, seed=args.seed)


def read_lens_arg(model, directory: str | None):
    """A lens from a ``--lens`` value: ``None`` or ``"logit"`` is the logit lens, else a folder."""
    from beyond_top1.lenses import LogitLens, load_lens

    return LogitLens(model) if directory in (None, "logit") else load_lens(directory, model)
