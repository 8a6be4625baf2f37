"""Wall time of the tuned lens at its default settings, and whether it equals a saved one.

Trains ``TunedLens.fit`` with ``TunedLensTraining()`` (seed 0) on the same train texts as
``experiments/lenses.py`` and, with ``--compare DIR``, reports the largest weight difference to
the lens saved there (0.0: the same lens, so that lens' evaluation applies to this run).

    python experiments/tuned_lens_wall.py --compare /work/runs/lenses/tuned
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--compare", help="a saved tuned lens to compare the weights with")
    args = parser.parse_args(argv)

    import torch

    import beyond_top1 as bt
    from beyond_top1.lenses import TunedLensTraining

    model = bt.load_model(args.model)
    train = bt.wiki_texts(args.n_train, split="train", seed=0)
    start = time.perf_counter()
    lens = bt.TunedLens.fit(model, train, settings=TunedLensTraining(seed=0), progress=False)
    run = lens.training_settings
    report = {
        "wall_s": round(time.perf_counter() - start, 1),
        "steps": run["steps"],
        "tokens": run["tokens"],
        "cpu_seconds": run["cpu_seconds"],
        "threads": torch.get_num_threads(),
        "heldout_kl_mean": sum(run["heldout_kl"]) / len(run["heldout_kl"]),
    }
    if args.compare:
        saved = bt.load_lens(args.compare, model).state_dict()
        ours = lens.state_dict()
        report["max_weight_diff"] = max(float((ours[k] - saved[k]).abs().max()) for k in ours)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
