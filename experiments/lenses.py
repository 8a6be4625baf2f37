"""Logit, linear-shortcut and tuned lenses on the default model (issue 3; papers 002/004).

Fits the linear-shortcut lens (least squares, default settings) and the tuned lens (its default
training, init from least squares) on the Wikipedia train split with the lens-fit task, scores
all three lenses on validation texts with the lens-metrics task, computes the quality-of-fit
matrix on a layer subset, and checks the expectations of issue 3.

Writes to ``--out``: ``linear/`` and ``tuned/`` (lens folders; ``tuned/training_history.csv``),
``lens_metrics.csv``/``.json`` and ``figures/<metric>.*`` (the lens-metrics task's files),
``quality_of_fit.csv`` and ``figures/quality_of_fit.*``, ``checks.json`` and ``summary.json``.

    nice -n 10 python experiments/lenses.py --out /work/runs/lenses
    python experiments/lenses.py --quick --out /tmp/lenses-quick     # smoke run, ~1-2 min
"""

from __future__ import annotations

import os

# On a shared, oversubscribed machine, spinning OpenMP threads burn CPU while waiting for a
# descheduled peer (3x slower here); passive waiting must be chosen before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import time  # noqa: E402

import pandas as pd  # noqa: E402

from beyond_top1.figures import plot_quality_of_fit  # noqa: E402
from beyond_top1.fileio import OutputFolder  # noqa: E402
from beyond_top1.lenses import LogitLens  # noqa: E402
from beyond_top1.lenses.io import LensFileError  # noqa: E402
from beyond_top1.lenses.metrics import quality_of_fit_matrix  # noqa: E402
from beyond_top1.models import DEFAULT_MODEL, load_model  # noqa: E402
from beyond_top1.tasks import TextSpec, lens_eval, lens_fit  # noqa: E402
from beyond_top1.tasks.common import figure  # noqa: E402

SHOWN = ["r2", "precision_at_1", "kl", "cross_entropy"]
SHORT = {"r2": "r2", "precision_at_1": "P@1", "kl": "KL", "cross_entropy": "CE"}
TUNED_KEYS = ("init", "max_steps", "lr", "steps", "tokens", "seconds", "cpu_seconds", "threads")
TUNED_KEYS += ("time_limit_s", "clock")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/work/runs/lenses", help="output folder")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n-train", type=int, default=500, help="train texts (both lenses)")
    parser.add_argument("--n-val", type=int, default=300, help="validation texts to score on")
    parser.add_argument("--seed", type=int, default=0, help="text order and training seed")
    parser.add_argument(
        "--time-limit", type=float, default=600.0, help="tuned-lens training guard (s)"
    )
    parser.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="what --time-limit counts: wall seconds, or CPU seconds per torch thread (the wall "
        "time on an idle machine; for a shared one). Default: %(default)s",
    )
    parser.add_argument("--qof-every", type=int, default=3, help="quality-of-fit layer stride")
    parser.add_argument("--qof-train", type=int, default=200, help="train texts for that matrix")
    parser.add_argument("--qof-val", type=int, default=100, help="val texts for that matrix")
    parser.add_argument("--reuse", action="store_true", help="load lenses already in --out")
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run (minutes): 3 tuned steps, 32 tokens"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val = min(args.n_train, 40), min(args.n_val, 8)
        args.qof_every, args.qof_train, args.qof_val = 10, 8, 4
    return args


def fit_configs(args) -> dict[str, lens_fit.LensFitConfig]:
    """The lens-fit task's configs: the defaults (what the issue's target is about); ``--quick``
    shrinks them."""
    train = TextSpec(split="train", stop=args.n_train, seed=args.seed)
    max_len = 32 if args.quick else None
    tuned = {"time_limit_s": args.time_limit, "clock": args.clock, "seed": args.seed}
    if args.quick:
        tuned["max_steps"] = 3
    return {
        "linear": lens_fit.LensFitConfig("linear", train, max_len=max_len),
        "tuned": lens_fit.LensFitConfig("tuned", train, max_len=max_len, **tuned),
    }


def fit_lens(model, config, folder: OutputFolder, name: str, reuse: bool):
    """The lens in ``OUT/name``: loaded with --reuse, else fitted and saved by the task; with
    the CPU seconds of the fit (``None`` when reused)."""
    path = folder.path / name
    if reuse and path.is_dir():
        try:
            lens = lens_fit.load(path, model)
        except LensFileError as exc:
            print(f"not reusing {path}: {exc}")
        else:
            print(f"reusing {path}")
            return lens, None
    cpu = time.process_time()
    lens = lens_fit.run(model, config, folder.claim(name), progress=False)
    return lens, round(time.process_time() - cpu, 1)


def compact_table(frame: pd.DataFrame, layers) -> pd.DataFrame:
    """Rows = layers, columns = (metric, lens)."""
    table = frame[frame.layer.isin(layers)].pivot(index="layer", columns="lens", values=SHOWN)
    table = table.reindex(columns=[(m, lens) for m in SHOWN for lens in frame.lens.unique()])
    table.columns = [f"{SHORT[m]} {lens}" for m, lens in table.columns]
    return table


def check_expectations(frame: pd.DataFrame, n_layers: int) -> dict:
    """Issue 3's expectations, with the layers where each one fails."""
    before_last = frame[frame.layer < n_layers - 1]
    wide = before_last.pivot(index="layer", columns="lens", values=["r2", "kl", "precision_at_1"])

    def failures(mask) -> list[int]:
        return [int(layer) for layer, ok in mask.items() if not ok]

    checks = {
        "linear r2 > logit r2": failures(wide.r2.linear > wide.r2.logit),
        "linear KL < logit KL": failures(wide.kl.linear < wide.kl.logit),
        "linear P@1 > logit P@1": failures(wide.precision_at_1.linear > wide.precision_at_1.logit),
        "tuned KL < logit KL": failures(wide.kl.tuned < wide.kl.logit),
        "tuned KL < linear KL": failures(wide.kl.tuned < wide.kl.linear),
    }
    return {name: {"n_layers": len(wide), "failing_layers": bad} for name, bad in checks.items()}


def quality_of_fit(model, args, folder: OutputFolder, val: TextSpec, max_len) -> pd.DataFrame:
    """004's l -> l' map on every --qof-every-th layer (the lens-metrics task does all layers),
    written under the task's file name."""
    n_layers = model.cfg.n_layers
    layers = sorted({*range(0, n_layers, args.qof_every), n_layers - 1})
    fit = TextSpec(split="train", stop=args.qof_train, seed=args.seed + 1)
    matrix = quality_of_fit_matrix(
        model,
        fit.load(),
        val.load()[: args.qof_val],
        layers=layers,
        max_len=max_len,
        progress=False,
    )
    folder.write_csv(lens_eval.QUALITY_FILE, matrix)
    figure(folder, plot_quality_of_fit(matrix), "quality_of_fit")
    return matrix


def report(frame, matrix, checks, n_layers: int, n_val: int) -> None:
    shown_layers = sorted({*range(0, n_layers, 3), n_layers - 1})
    print(f"\nvalidation: {n_val} texts, {int(frame.n_tokens.iloc[0])} tokens")
    print(compact_table(frame, shown_layers).round(3).to_string())
    qof = matrix[matrix.target == n_layers - 1].set_index("source")[["r2_linear", "r2_identity"]]
    print("\nquality of fit to the last layer (validation r²):")
    print(qof.round(3).T.to_string())
    print("\nexpectations (layers 0..L-2; failing layers listed):")
    for name, check in checks.items():
        bad = check["failing_layers"]
        print(f"  {name}: {check['n_layers'] - len(bad)}/{check['n_layers']} layers ok {bad or ''}")


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = OutputFolder(args.out, lens_eval.KIND)  # checked before any work
    max_len = 32 if args.quick else None
    val = TextSpec(split="val", stop=args.n_val, seed=args.seed)
    summary: dict = {"command": vars(args)}
    with folder:
        model = load_model(args.model)
        n_layers = model.cfg.n_layers
        configs = fit_configs(args)
        linear, cpu = fit_lens(model, configs["linear"], folder, "linear", args.reuse)
        summary["linear_fit"] = {**linear.fit_settings, "cpu_seconds": cpu}
        fit = linear.fit_settings
        print(f"linear: {fit['n_texts']} texts, {fit['n_tokens']} tokens, {fit['seconds']} s wall")
        tuned, _ = fit_lens(model, configs["tuned"], folder, "tuned", args.reuse)
        run = tuned.training_settings
        summary["tuned_training"] = {key: run.get(key) for key in TUNED_KEYS}
        print(
            f"tuned: init={run['init']}, {run['steps']} steps, {run['tokens']} tokens, "
            f"{run['seconds']} s wall, {run['cpu_seconds']} CPU s on {run['threads']} threads "
            f"(limit {run['time_limit_s']} s on the {run['clock']} clock)"
        )

        start = time.perf_counter()
        lenses = {"logit": LogitLens(model), "linear": linear, "tuned": tuned}
        config = lens_eval.LensEvalConfig(val, max_len=max_len)
        frame = lens_eval.run(model, config, folder, lenses, progress=False)
        summary["eval_seconds"] = round(time.perf_counter() - start, 1)
        summary["metrics"] = lens_eval.headline(frame, n_layers)
        start = time.perf_counter()
        matrix = quality_of_fit(model, args, folder, val, max_len)
        summary["quality_of_fit_seconds"] = round(time.perf_counter() - start, 1)
        summary["quality_of_fit_layers"] = sorted(set(matrix.source) | set(matrix.target))

        checks = check_expectations(frame, n_layers)
        folder.write_json("checks.json", checks)
        folder.write_json("summary.json", summary)
    report(frame, matrix, checks, n_layers, args.n_val)
    print(f"\nwrote {folder.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
