"""Exact read-outs do not depend on precision, batch size or thread count (issue 12).

See docs/conventions.md, "Exact read-outs".

Scans the same texts (``--n-texts`` validation texts plus short prompts of 1-5 tokens, position
0 included so that a one-token prompt has a row) under every combination of precision (fp32,
bf16), batch size (1, 8) and torch threads (1, 2), and compares the top-k ids, the ranks within
the top k and ``s_1..s_k`` with the first configuration's, exactly. On a CPU without native bf16
the bf16 path runs emulated (``BEYOND_TOP1_BF16=emulate``: the same arithmetic as fp32 GEMMs of
the bf16-rounded values), so the bf16 code path is what is compared.

Also reports how many (position, layer) rows the float64 rule had to settle, and how far the
two precisions' log-probs differ against their stated bounds.

    python experiments/readout_invariance.py --n-texts 40 --out runs/invariance
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import beyond_top1 as bt
from beyond_top1 import ranking

PROMPTS = ["Paris", "The afterlife", "Paris is the", "In 1969 the first", "Water boils at 100"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-texts", type=int, default=40)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--out", default="runs/invariance")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bt.load_model(args.model)
    texts = bt.wiki_texts(args.n_texts, split="val") + PROMPTS
    if (
        os.environ.get(ranking.BF16_ENV) != "emulate"
        and ranking._bf16_gemm(torch.device("cpu")) is None
    ):
        os.environ[ranking.BF16_ENV] = "emulate"
    emulated = os.environ.get(ranking.BF16_ENV) == "emulate"
    configs = list(itertools.product(("fp32", "bf16"), (1, 8), (1, 2)))
    results, rows = {}, []
    for precision, batch_size, threads in configs:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        result = bt.scan(
            model,
            texts,
            k=args.k,
            max_len=args.max_len,
            batch_size=batch_size,
            precision=precision,
            score_first=True,
            progress=False,
        )
        seconds = time.perf_counter() - start
        results[precision, batch_size, threads] = result
        rows.append(
            {
                "precision": precision,
                "batch_size": batch_size,
                "threads": threads,
                "positions": len(result),
                "seconds": round(seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    reference = results[configs[0]]
    k = args.k
    comparison = []
    for config, result in results.items():
        same_ids = np.array_equal(result.top_ids, reference.top_ids)
        same_ranks = np.array_equal(
            np.minimum(result.final_ranks, k + 1), np.minimum(reference.final_ranks, k + 1)
        )
        same_s = np.array_equal(result.saturation_array(), reference.saturation_array())
        lp = np.abs(result.top_logprobs - reference.top_logprobs).max()
        comparison.append(
            {
                "config": "/".join(map(str, config)),
                "top_ids_identical": bool(same_ids),
                "ranks_within_k_identical": bool(same_ranks),
                "s_identical": bool(same_s),
                "max_abs_logprob_diff_vs_reference": float(lp),
            }
        )
    # how often the exact rule had to decide, and the log-prob bounds, on one batch
    torch.set_num_threads(1)
    resid = next(
        iter(
            bt.stream_residuals(
                model, texts[:8], max_len=args.max_len, progress=False, score_first=True
            )
        )
    ).resid
    L = model.cfg.n_layers
    lens = bt.LogitLens(model)
    stats = {}
    for precision in ("fp32", "bf16"):
        readout = ranking.lens_topk(lens, resid, range(L), args.k, precision=precision)
        stats[precision] = {
            "rows": int(resid.shape[0] * L),
            "rows_settled_by_float64": readout.n_exact_rows,
            "rows_read_whole": readout.n_fallback_rows,
            "logprob_bound_median": float(readout.logprob_error.median()),
            "logprob_bound_max": float(readout.logprob_error.max()),
        }
    summary = {
        "model": args.model,
        "n_texts": args.n_texts,
        "prompts": PROMPTS,
        "k": args.k,
        "bf16_emulated": emulated,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "runs": rows,
        "comparison": comparison,
        "readout_one_batch": stats,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for row in comparison:
        print(row)
    print(json.dumps(stats, indent=1))
    return summary


if __name__ == "__main__":
    main()
