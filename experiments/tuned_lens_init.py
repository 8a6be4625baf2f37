"""Does initialising the tuned lens from least squares train faster than the zero init?

Trains the tuned lens twice on the same train texts with the same settings and the same time
budget, once from the least-squares solution (``init="linear"``, whose fit is part of the
budget) and once from zero (the public recipe's init), and compares the held-out KL (the
training's own held-out texts, all layers) against the time spent.

Writes ``history_{linear,zero}.csv``, ``init_comparison.csv`` (mean held-out KL over layers at
checkpoints of the budget) and ``figures/init_comparison.{png,svg}`` to ``--out``.

    nice -n 10 python experiments/tuned_lens_init.py --out /work/runs/lenses/init
"""

from __future__ import annotations

import os

# On a shared, oversubscribed machine, spinning OpenMP threads burn CPU while waiting for a
# descheduled peer (3x slower here); passive waiting must be chosen before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import beyond_top1 as bt  # noqa: E402
from beyond_top1.figures import save_figure  # noqa: E402
from beyond_top1.models import DEFAULT_MODEL  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/work/runs/lenses/init")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per init")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    return parser.parse_args(argv)


def kl_at(history: pd.DataFrame, seconds: float) -> float:
    """Mean over layers of the best held-out KL reached within ``seconds``."""
    reached = history[history.seconds <= seconds]
    if reached.empty:
        return float("nan")
    return float(reached.groupby("layer").heldout_kl.min().mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bt.load_model(args.model)
    texts = bt.wiki_texts(40 if args.quick else args.n_train, split="train", seed=args.seed)
    settings = {
        "max_steps": 10_000,  # the budget decides
        "time_limit_s": args.budget,
        "clock": args.clock,
        "eval_every": args.eval_every,
        "seed": args.seed,
    }
    if args.quick:
        settings.update(max_len=32, n_init_texts=16, n_heldout_texts=4, tokens_per_layer=64)
    histories = {}
    for init in ("linear", "zero"):
        lens = bt.TunedLens.fit(model, texts, init=init, progress=False, **settings)
        history = lens.training_history
        history.to_csv(out / f"history_{init}.csv", index=False)
        histories[init] = history
        run = lens.training_settings
        print(
            f"init={init}: {run['steps']} steps, {run['tokens']} tokens, "
            f"{run['seconds']} s wall, {run['cpu_seconds']} CPU s"
        )

    checkpoints = [args.budget * f for f in (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)]
    table = pd.DataFrame(
        {
            "seconds": checkpoints,
            **{f"kl_{init}": [kl_at(h, s) for s in checkpoints] for init, h in histories.items()},
        }
    )
    table.to_csv(out / "init_comparison.csv", index=False)
    print(f"mean held-out KL over layers (nats) vs. {args.clock} seconds:")
    print(table.round(3).to_string(index=False))

    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    for init, history in histories.items():
        curve = history.groupby("step").agg(seconds=("seconds", "max"), kl=("heldout_kl", "mean"))
        ax.plot(curve.seconds, curve.kl, marker="o", markersize=3, label=f"init={init}")
    ax.set_xlabel(f"{args.clock} seconds (init included)")
    ax.set_ylabel("held-out KL, mean over layers (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out / "figures" / "init_comparison")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
