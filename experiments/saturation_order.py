"""Do top-k tokens saturate in order? Trained vs. untrained models (001 §2.2, Table 1 / Fig. 3).

Scans the validation texts with the trained default model and the two untrained twins (the scan
task: resumable, one folder per model under ``--out``), then runs the ordering task on all of
them side by side. Writes to ``--out``:

    <model>/                  the scans (smollm2-135m/, untrained-smollm2-135m/, ...)
    ordering.csv              one row per model: 001's ordering statistics
    rank_correspondence.csv   per model and rank: mean place and fraction in place
    figures/                  ordering_comparison, rank_correspondence, saturation_histograms
                              (.png/.svg)
    summary.json              per model: the scan's headline (layers, positions, mean s_i,
                              tokens/s) and the ordering's

    python experiments/saturation_order.py --out runs/saturation --n-texts 200
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402

from beyond_top1.fileio import OutputFolder  # noqa: E402
from beyond_top1.models import load_model  # noqa: E402
from beyond_top1.reproduce import slug  # noqa: E402
from beyond_top1.runtime import threads  # noqa: E402
from beyond_top1.tasks import TextSpec, ordering  # noqa: E402
from beyond_top1.tasks import scan as scan_task  # noqa: E402

MODELS = ("smollm2-135m", "untrained:smollm2-135m", "untrained:gpt2-small")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/saturation")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--n-texts", type=int, default=200)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = OutputFolder(args.out, ordering.KIND)  # checked before any work
    config = scan_task.ScanConfig(
        texts=TextSpec(split="val", stop=args.n_texts, seed=args.seed),
        k=args.k,
        precision=args.precision,
        max_len=args.max_len,
    )
    scans, heads = {}, {}
    with threads(args.threads), folder:
        for name in args.models:
            target = folder.claim(slug(name))
            model = load_model(name, seed=args.seed)
            scans[name] = scan_task.run(model, config, target, resume=True)  # or its files
            heads[name] = scan_task.headline(scans[name], target)
            print(f"{name}: {heads[name]}", flush=True)
            del model
        stats = ordering.run(
            scans,
            ordering.OrderingConfig(n_permutations=args.permutations, seed=args.seed),
            folder,
        )
        ordered = ordering.headline(stats)
        summary = {
            "texts": config.texts.describe(),
            "settings": vars(args),
            "models": {
                name: {"scan": heads[name], "ordering": ordered.get(name)} for name in scans
            },
        }
        folder.write_json("summary.json", summary)
    print(ordering.format_table({name: st.summary() for name, st in stats.items()}))
    speed = {
        name: {"L": h["n_layers"], "tokens/s": h.get("tokens_per_second")}
        for name, h in heads.items()
    }
    print(pd.DataFrame.from_dict(speed, orient="index").to_string())
    corr = pd.concat({name: st.rank_correspondence.set_index("rank") for name, st in stats.items()})
    print(corr.round(3).to_string())
    print(f"wrote {folder.path}/ordering.csv, rank_correspondence.csv, summary.json and figures/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
