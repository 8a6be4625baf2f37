"""``beyond-top1 early-exit``: simulated early exit and the real early-exit decoder.

* ``early-exit simulate --out DIR``: one scan of the texts, then curves (``curves.csv``), the
  layers-saved table (``layers_saved.csv``), 001's better-LM test (``better_lm.json``) and the
  figure (``figures/early_exit.png/.svg``). No compute is skipped: it is a simulation.
* ``early-exit generate --out DIR``: greedy decoding that really stops at the exit layer,
  timed against full greedy decoding (``generation.csv``, ``generation_per_prompt.csv``).
"""

from __future__ import annotations

import argparse

from beyond_top1.cli.args import (
    add_model_args,
    add_score_first_arg,
    add_text_args,
    load_model_from_args,
    read_probe,
    text_spec_from_args,
    texts_from_args,
)
from beyond_top1.early_exit import DEFAULT_BETTER_LM_MARGIN
from beyond_top1.fileio import OutputFolder
from beyond_top1.lenses import LinearShortcutLens, lens_set
from beyond_top1.ranking import PRECISIONS
from beyond_top1.tasks import early_exit, generation
from beyond_top1.tasks.texts import TextSpec

CRITERIA = ("margin", "confidence_004", "cosine", "probe", "probe_conf", "fixed")


def _lenses(model, args: argparse.Namespace) -> dict:
    linear = args.linear_lens
    if linear == "fit":
        fit_texts = TextSpec(split="train", stop=args.fit_texts, seed=args.seed).load()
        linear = LinearShortcutLens.fit(model, fit_texts, max_len=args.max_len)
    return lens_set(model, linear=linear, tuned=args.tuned_lens)


def _cmd_simulate(args: argparse.Namespace) -> int:
    folder = OutputFolder(args.out, early_exit.KIND)  # checked before any work
    config = early_exit.EarlyExitConfig(
        texts=text_spec_from_args(args),
        max_len=args.max_len,
        batch_size=args.batch_size,
        precision=args.precision,
        score_first=args.score_first_token,
        better_lm_m=args.m,
    )
    model = load_model_from_args(args)
    lenses = _lenses(model, args)
    probe = read_probe(args.probe, model)
    with folder:
        outcome = early_exit.run(model, config, folder, lenses, probe=probe)
    print(f"# {outcome.n_positions} positions of {config.texts.describe()} (simulation)")
    print(early_exit.describe(outcome))
    print(f"wrote {folder.path}/curves.csv, layers_saved.csv, better_lm.json, figures/early_exit.*")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    folder = OutputFolder(args.out, generation.KIND)  # checked before any work
    config = generation.GenerationConfig(
        prompts=tuple(generation.prompts_from_texts(texts_from_args(args), args.prompt_words)),
        criterion=args.criterion,
        theta=args.theta,
        lens=args.lens,
        min_layer=args.min_layer,
        n_avg=args.n_avg,
        new_tokens=args.new_tokens,
        threads=args.threads,
        example=False,
    )
    model = load_model_from_args(args)
    lenses = _lenses(model, args)
    probe = read_probe(args.probe, model)
    with folder:
        bench = generation.run(model, config, folder, lenses, probe=probe)
    print(bench)
    print(f"wrote {folder.path}/{generation.SUMMARY_FILE}, {generation.PER_PROMPT_FILE}")
    return 0


def _add_lens_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--linear-lens", help="a saved linear-shortcut lens folder, or 'fit' to fit one now"
    )
    parser.add_argument("--fit-texts", type=int, default=200, help="train texts for 'fit'")
    parser.add_argument("--tuned-lens", help="a saved tuned lens folder (optional)")
    parser.add_argument(
        "--probe", help="a task probe: TaskProbe .safetensors, or a pickle with predict()"
    )


def add_parsers(subparsers) -> None:
    """Register ``early-exit simulate`` and ``early-exit generate``."""
    ee = subparsers.add_parser(
        "early-exit", help="simulated early exit and a real early-exit decoder"
    )
    modes = ee.add_subparsers(dest="mode", required=True)

    sim = modes.add_parser("simulate", help="curves, layers-saved table, better-LM test")
    sim.add_argument("--out", required=True, help="folder for CSV/JSON and figures")
    add_model_args(sim)
    add_text_args(sim, n_texts=60, split="val")
    add_score_first_arg(sim)
    _add_lens_args(sim)
    sim.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    sim.add_argument(
        "--m",
        type=int,
        default=None,
        help=f"better-LM: early means s_2 <= L-1-m (default: min({DEFAULT_BETTER_LM_MARGIN}, L-2))",
    )
    sim.set_defaults(run=_cmd_simulate)

    gen = modes.add_parser("generate", help="real early-exit greedy decoding vs. full decoding")
    gen.add_argument("--out", required=True, help="folder for JSON/CSV")
    add_model_args(gen)
    add_text_args(gen, n_texts=20, split="val")
    _add_lens_args(gen)
    gen.add_argument("--criterion", default="margin", choices=list(CRITERIA))
    gen.add_argument("--theta", type=float, default=0.9, help="threshold (fixed: the layer)")
    gen.add_argument("--lens", default="logit", help="lens for predictions: logit/linear/tuned")
    gen.add_argument("--min-layer", type=int, default=0, help="check the criterion from here")
    gen.add_argument("--n-avg", type=float, help="confidence_004: N, the mean input length")
    gen.add_argument("--prompt-words", type=int, default=24, help="words per prompt")
    gen.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per prompt")
    gen.add_argument(
        "--threads", type=int, help="torch threads while decoding (1 is fastest on a busy CPU)"
    )
    gen.set_defaults(run=_cmd_generate)
