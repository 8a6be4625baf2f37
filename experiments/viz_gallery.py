"""Renderers and ordering figures on the default model and its untrained twin.

Scans a few validation texts with the trained model and its untrained twin, computes 001's
ordering statistics, draws the ordering figures (rank correspondence, s_i histograms, trained vs.
untrained) and saves the CircuitsVis views of one prompt (plus a lens comparison when a lens
folder is given) as offline HTML, with headless-Chromium screenshots when Chromium is present.

    python experiments/viz_gallery.py --out /work/runs/viz/gallery --texts 24 --max-len 64 \\
        --lens-dir /work/runs/lenses/explore/linear500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import beyond_top1 as bt
from beyond_top1 import viz
from beyond_top1.figures import (
    plot_ordering_comparison,
    plot_rank_correspondence,
    plot_saturation_histograms,
    save_figure,
)
from beyond_top1.models import DEFAULT_MODEL

# The headless-Chromium helper is test tooling, not part of the library.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import browser  # noqa: E402, I001

PROMPT = "The capital of France is Paris. The capital of Germany is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--texts", type=int, default=24, help="validation texts to scan")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--lens-dir", help="a saved lens to compare with the logit lens")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = bt.wiki_texts(args.texts, split="val", seed=args.seed)
    metrics, stats, models = {}, {}, {}
    for label, name in (("trained", args.model), ("untrained", f"untrained:{args.model}")):
        model = bt.load_model(name, seed=args.seed) if label == "untrained" else bt.load_model(name)
        models[label] = model
        start = time.perf_counter()
        result = bt.scan(
            model,
            texts,
            k=args.k,
            max_len=args.max_len,
            precision=args.precision,
            progress=False,
            out=out / "scans" / label,  # re-runs reuse finished scans
            resume=True,
        )
        st = result.ordering(n_permutations=args.permutations, seed=args.seed)
        stats[label] = st
        metrics[label] = {
            "model": name,
            "scan_seconds": round(time.perf_counter() - start, 1),
            **st.summary(),
            "rank_correspondence": st.rank_correspondence.to_dict(orient="list"),
        }
        print(label, json.dumps(st.summary()))
    figures = {
        "rank_correspondence": plot_rank_correspondence(stats),
        "saturation_histograms": plot_saturation_histograms(stats),
        "ordering_comparison": plot_ordering_comparison(stats),
    }
    for name, fig in figures.items():
        save_figure(fig, out / "figures" / name)

    trained = models["trained"]
    traj = bt.trajectory(trained, args.prompt, k=args.k)
    pages = {
        "trajectory": viz.trajectory_view(traj),
        "token_log_probs": viz.token_log_probs(traj),
        "untrained_trajectory": viz.trajectory_view(
            bt.trajectory(models["untrained"], args.prompt, k=args.k)
        ),
    }
    if args.lens_dir:
        lens = bt.load_lens(args.lens_dir, trained)
        pages["compare_lenses"] = viz.compare_lenses(
            traj, bt.trajectory(trained, args.prompt, lens=lens, k=args.k)
        )
    metrics["prompt"] = {"text": args.prompt, "saturation": traj.saturation.to_dict("records")}
    for name, view in pages.items():
        path = view.save(out / "views" / f"{name}.html")
        try:
            browser.screenshot(path, out / "screenshots" / f"{name}.png", window_size=(1280, 1400))
        except browser.BrowserUnavailable as exc:
            print(f"no screenshot: {exc}")
            break
    metrics["settings"] = vars(args)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
