"""Do top-k tokens saturate in order? Trained vs. untrained models (001 §2.2, Table 1 / Fig. 3).

Scans the validation texts with the trained default model and the two untrained twins
(resumable, one folder per model under ``--out``), then writes the side-by-side ordering table
(``ordering.csv``/``.json``) and figures: rank correspondence, histograms of ``s_i`` per rank and
the ordering comparison.

    python experiments/saturation_order.py --out runs/saturation --n-texts 200
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = ("smollm2-135m", "untrained:smollm2-135m", "untrained:gpt2-small")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/saturation")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--n-texts", type=int, default=200)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import pandas as pd

    import beyond_top1 as bt
    from beyond_top1.figures import (
        plot_ordering_comparison,
        plot_rank_correspondence,
        plot_saturation_histograms,
        save_figure,
    )
    from beyond_top1.saturation import ORDERING_LABELS

    out = Path(args.out)
    texts = bt.wiki_texts(args.n_texts, split="val", seed=args.seed)
    stats, rows = {}, []
    for name in args.models:
        folder = out / name.replace(":", "-")
        if not (folder / "summary.json").is_file():
            model = bt.load_model(name, seed=args.seed)
            start = time.perf_counter()
            bt.scan(
                model,
                texts,
                k=args.k,
                max_len=args.max_len,
                precision=args.precision,
                out=folder,
                resume=(folder / "settings.json").is_file(),
                texts_description=f"wiki_texts({args.n_texts}, 'val', seed={args.seed})",
                n_permutations=args.permutations,
            )
            print(f"{name}: scanned in {time.perf_counter() - start:.0f} s")
            del model
        result = bt.load_scan(folder)
        timing = json.loads((folder / "timing.json").read_text())
        stats[name] = result.ordering(n_permutations=args.permutations, seed=args.seed)
        rows.append(
            {
                "model": name,
                "L": result.n_layers,
                **stats[name].summary(),
                "mean_s": [round(float(x), 2) for x in result.saturation_array().mean(0)],
                "tokens_per_second": timing.get("tokens_per_second"),
            }
        )
    table = pd.DataFrame(rows).set_index("model")
    table.to_csv(out / "ordering.csv")
    (out / "ordering.json").write_text(table.reset_index().to_json(orient="records", indent=1))
    corr = pd.concat(
        {name: s.rank_correspondence.set_index("rank") for name, s in stats.items()}, axis=1
    )
    corr.to_csv(out / "rank_correspondence.csv")
    figures = out / "figures"
    save_figure(plot_rank_correspondence(stats), figures / "rank_correspondence")
    save_figure(plot_saturation_histograms(stats), figures / "saturation_histograms")
    save_figure(plot_ordering_comparison(stats), figures / "ordering_comparison")
    columns = ["L", *ORDERING_LABELS, "tokens_per_second"]
    print(table[columns].T.to_string(float_format=lambda x: f"{x:.4g}"))
    print(corr.round(3).to_string())
    print(f"wrote {out}/ordering.csv, rank_correspondence.csv and figures/")


if __name__ == "__main__":
    main()
