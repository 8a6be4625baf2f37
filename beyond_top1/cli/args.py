"""Arguments and loaders shared by the ``beyond-top1`` subcommands."""

from __future__ import annotations

import argparse

from beyond_top1 import models
from beyond_top1.data import load_texts
from beyond_top1.lenses import LogitLens, load_lens
from beyond_top1.models import DEFAULT_MODEL
from beyond_top1.probes import read_probe
from beyond_top1.tasks.texts import TextSpec


def positive_int(value: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--device`` and ``--seed`` to ``parser``."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model name, Hugging Face 'org/name' or local Hugging Face folder (a folder, and "
        "any 'org/name', on TransformerLens 4; default: %(default)s)",
    )
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


def text_spec_from_args(args: argparse.Namespace) -> TextSpec:
    """The texts :func:`add_text_args` describes, as a :class:`TextSpec`."""
    seed = getattr(args, "seed", 0)
    if args.texts_file:
        load_texts(args.texts_file)  # a missing or unreadable file fails here, before any work
        return TextSpec(file=args.texts_file, stop=args.n_texts, seed=seed)
    n_texts = args.n_texts if args.n_texts is not None else args.default_n_texts
    return TextSpec(split=args.split, stop=n_texts, seed=seed)


def texts_from_args(args: argparse.Namespace) -> list[str]:
    """The texts :func:`add_text_args` describes: ``--texts-file`` or Wikipedia texts."""
    return text_spec_from_args(args).load()


def load_model_from_args(args: argparse.Namespace):
    """The model :func:`add_model_args` describes (``--model``, ``--device``, ``--seed``)."""
    return models.load_model(args.model, device=args.device, seed=args.seed)


def read_lens_arg(model, directory: str | None):
    """A lens from a ``--lens`` value: ``None`` or ``"logit"`` is the logit lens, else a folder."""
    return LogitLens(model) if directory in (None, "logit") else load_lens(directory, model)


__all__ = [
    "add_model_args",
    "add_score_first_arg",
    "add_text_args",
    "load_model_from_args",
    "positive_int",
    "read_lens_arg",
    "read_probe",
    "text_spec_from_args",
    "texts_from_args",
]
