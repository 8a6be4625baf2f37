"""``beyond-top1 early-exit``: simulated early exit and the real early-exit decoder.

* ``early-exit simulate --out DIR``: one pass over texts, then curves (``curves.csv``), the
  layers-saved table (``layers_saved.csv``), 001's better-LM test (``better_lm.json``) and the
  figure (``figures/early_exit.png/.svg``). No compute is skipped: it is a simulation.
* ``early-exit generate --out DIR``: greedy decoding that really stops at the exit layer,
  timed against full greedy decoding (``generation.csv``, ``generation_per_prompt.csv``).
"""

from __future__ import annotations

import argparse
import pickle
import time

from beyond_top1.cli_args import (
    add_model_args,
    add_text_args,
    load_model_from_args,
    texts_from_args,
)
from beyond_top1.fileio import OutputFolder


def _lenses(model, args: argparse.Namespace) -> dict:
    from beyond_top1.lenses import LinearShortcutLens, LogitLens, load_lens

    lenses = {"logit": LogitLens(model)}
    if args.linear_lens == "fit":
        from beyond_top1.data import wiki_texts

        fit_texts = wiki_texts(args.fit_texts, split="train", seed=args.seed)
        lenses["linear"] = LinearShortcutLens.fit(model, fit_texts, max_len=args.max_len)
    elif args.linear_lens:
        lenses["linear"] = load_lens(args.linear_lens, model)
    if args.tuned_lens:
        lenses["tuned"] = load_lens(args.tuned_lens, model)
    return lenses


def read_probe(path: str | None, model):
    """A task probe: a ``.safetensors`` file from ``TaskProbe.save`` (checked against
    ``model``), or a pickle of any object with ``predict`` (only load pickles you trust)."""
    if not path:
        return None
    if str(path).endswith(".safetensors"):
        from beyond_top1.probes import load_probe

        return load_probe(path, model)
    with open(path, "rb") as handle:
        probe = pickle.load(handle)  # noqa: S301 - the user's own artefact
    if not hasattr(probe, "predict"):
        raise ValueError(f"{path} holds a {type(probe).__name__}, which has no predict()")
    return probe


def _cmd_simulate(args: argparse.Namespace) -> int:
    folder = OutputFolder(args.out, "early-exit")  # checked before any work
    model = load_model_from_args(args)
    lenses = _lenses(model, args)
    probe = read_probe(args.probe, model)
    texts = texts_from_args(args)
    with folder as out:
        return _simulate(args, model, lenses, probe, texts, out)


def _simulate(args, model, lenses, probe, texts, out: OutputFolder) -> int:
    from beyond_top1.early_exit import (
        better_language_modeling,
        collect_exit_signals,
        early_exit_curves,
        layers_saved_table,
    )
    from beyond_top1.figures import plot_early_exit_curves, save_figure

    start = time.perf_counter()
    signals = collect_exit_signals(
        model,
        texts,
        lenses,
        probe=probe,
        batch_size=args.batch_size,
        max_len=args.max_len,
        precision=args.precision,
    )
    seconds = time.perf_counter() - start
    signals.save(out.path / "signals")
    curves = early_exit_curves(signals)
    table = layers_saved_table(curves)
    better = better_language_modeling(signals, m=args.m)
    out.write_csv("curves.csv", curves)
    out.write_csv("layers_saved.csv", table)
    out.write_json("better_lm.json", better.to_dict())
    save_figure(plot_early_exit_curves(curves), out.path / "figures" / "early_exit")
    print(f"# {len(signals)} positions from {len(texts)} texts in {seconds:.0f} s (simulation)")
    print(table.round(3).to_string(index=False))
    print(better.summary())
    print(f"wrote {out.path}/curves.csv, layers_saved.csv, better_lm.json, figures/early_exit.*")
    return 0


def make_criterion(name: str, theta: float, *, min_layer: int = 0, probe=None, n_avg=None):
    """A decoder criterion by name: margin, confidence_004, cosine, probe, probe_conf, fixed."""
    from beyond_top1.generation import (
        Confidence004Exit,
        CosineExit,
        FixedLayerExit,
        MarginExit,
        ProbeExit,
    )

    if name == "margin":
        return MarginExit(theta, min_layer)
    if name == "confidence_004":
        if n_avg is None:
            raise ValueError("confidence_004 needs N (--n-avg), the mean input length")
        return Confidence004Exit(theta, n_avg, min_layer=min_layer)
    if name == "cosine":
        return CosineExit(theta, min_layer)
    if name in ("probe", "probe_conf"):
        if probe is None:
            raise ValueError("the probe criteria need --probe FILE")
        return ProbeExit(probe, theta if name == "probe_conf" else None, min_layer)
    if name == "fixed":
        return FixedLayerExit(int(theta))
    raise ValueError(f"unknown criterion {name!r}")


def prompts_from_texts(texts: list[str], n_words: int) -> list[str]:
    """The first ``n_words`` words of each text (generation prompts)."""
    return [" ".join(text.split()[:n_words]) for text in texts]


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from beyond_top1.generation import benchmark_early_exit

    folder = OutputFolder(args.out, "early-exit-generate")  # checked before any work
    model = load_model_from_args(args)
    lenses = _lenses(model, args)
    if args.lens not in lenses:
        raise ValueError(f"--lens {args.lens} is not loaded; have {sorted(lenses)}")
    probe = read_probe(args.probe, model)
    criterion = make_criterion(
        args.criterion, args.theta, min_layer=args.min_layer, probe=probe, n_avg=args.n_avg
    )
    prompts = prompts_from_texts(texts_from_args(args), args.prompt_words)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with folder as out:
            bench = benchmark_early_exit(
                model, prompts, criterion, lens=lenses[args.lens], max_new_tokens=args.new_tokens
            )
            out.write_csv("generation_per_prompt.csv", bench.per_prompt)
            out.write_csv("generation.csv", bench.summary())
    finally:
        torch.set_num_threads(threads)
    print(bench)
    print(f"wrote {out.path}/generation.csv, generation_per_prompt.csv")
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


def add_parser(subparsers) -> None:
    """Register ``early-exit simulate`` and ``early-exit generate``."""
    ee = subparsers.add_parser(
        "early-exit", help="simulated early exit and a real early-exit decoder"
    )
    modes = ee.add_subparsers(dest="mode", required=True)

    sim = modes.add_parser("simulate", help="curves, layers-saved table, better-LM test")
    sim.add_argument("--out", required=True, help="folder for CSV/JSON and figures")
    add_model_args(sim)
    add_text_args(sim, n_texts=60, split="val")
    _add_lens_args(sim)
    sim.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    sim.add_argument("--m", type=int, default=6, help="better-LM: early means s_2 <= L-1-m")
    sim.set_defaults(run=_cmd_simulate)

    gen = modes.add_parser("generate", help="real early-exit greedy decoding vs. full decoding")
    gen.add_argument("--out", required=True, help="folder for JSON/CSV")
    add_model_args(gen)
    add_text_args(gen, n_texts=20, split="val")
    _add_lens_args(gen)
    gen.add_argument(
        "--criterion",
        default="margin",
        choices=["margin", "confidence_004", "cosine", "probe", "probe_conf", "fixed"],
    )
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
