"""What the exact read-out rule costs: ``lens_topk`` now vs. the kernel before it (issue 12).

The baseline is ``beyond_top1/ranking.py`` as of ``--baseline`` (default: the last commit before
the exact rule), loaded from git history into a temporary module, so both read the same residual
streams in one process. Runs alternate (baseline, current, baseline, current, ...) with one torch
thread; the table reports each run's seconds and the median ratio.

    python experiments/bench_exact_readout.py --tokens 512 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import beyond_top1 as bt
from beyond_top1 import ranking
from beyond_top1.stats import saturation_layers

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "0c531db"  # main before issue 12


def load_baseline(commit: str):
    source = subprocess.run(
        ["git", "show", f"{commit}:beyond_top1/ranking.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_ranking.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_ranking", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_ranking"] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", default=BASELINE)
    p.add_argument("--out", help="write the summary JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    baseline = load_baseline(args.baseline)
    model = bt.load_model(args.model)
    L = model.cfg.n_layers
    resid = []
    for batch in bt.stream_residuals(model, bt.wiki_texts(64, split="val"), progress=False):
        resid.append(batch.resid)
        if sum(len(r) for r in resid) >= args.tokens:
            break
    resid = torch.cat(resid)[: args.tokens]
    lens = bt.LogitLens(model)
    kernels = {"baseline": baseline.lens_topk, "exact": ranking.lens_topk}
    for run in kernels.values():  # warm-up: compile the fused passes
        run(lens, resid[:400], range(L), args.k)
    seconds = {name: [] for name in kernels}
    readouts = {}
    for _ in range(args.repeats):
        for name, run in kernels.items():
            start = time.perf_counter()
            readouts[name] = run(lens, resid, range(L), args.k)
            seconds[name].append(time.perf_counter() - start)
    ratios = [e / b for e, b in zip(seconds["exact"], seconds["baseline"], strict=True)]
    new, old = readouts["exact"], readouts["baseline"]
    summary = {
        "model": args.model,
        "tokens": int(resid.shape[0]),
        "layers": L,
        "k": args.k,
        "threads": 1,
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "median_ratio_exact_over_baseline": round(statistics.median(ratios), 3),
        "rows": int(resid.shape[0] * L),
        "rows_settled_by_float64": new.n_exact_rows,
        "rows_read_whole": new.n_fallback_rows,
        "rows_whose_top_k_differs_from_baseline": int((new.top_ids != old.top_ids).any(-1).sum()),
        "positions_whose_s_differs_from_baseline": int(
            (saturation_layers(new.top_ids) != saturation_layers(old.top_ids)).any(-1).sum()
        ),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
