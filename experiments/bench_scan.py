"""Benchmark the saturation scan against a naive reference and the FLOP bound, in one run.

Measured on the same texts in this one process tree:

* **ours (fp32)** and **ours (bf16, verified)**: :func:`beyond_top1.scan` tokens/second, the full
  read-out (every layer kept) and the saturation-only one (``keep="saturation"``: ``-sat``);
* **forward**: the forward pass alone, caching the residual streams a scan reads
  (:func:`beyond_top1.activations.stream_residuals`);
* **TL 4.3**: TransformerLens 4's ``logit_lens(model, tokens, positions=None, top_k=k)`` on a
  compatibility-mode bridge, on the same right-padded token ids (it also reads the padding and
  position 0, which our scan does not score; tokens/s counts the same scored tokens), when the
  installed TransformerLens is 4.x;
* **naive**: what the public code of 001 does — hidden states of every layer, final norm +
  unembedding to full ``[layers, pos, vocab]`` logits, a full sort of the vocabulary per layer,
  python loops over positions and ranks — on a subset of the texts;
* **FLOP bound**: (forward FLOPs + per-layer unembedding FLOPs) per token divided by the fp32
  matmul rate measured here, now.

Every configuration runs in a fresh subprocess, so its peak RSS is its own; each runs at two
corpus sizes to show whether memory grows with the number of texts. The naive reference is also
checked to give the same saturation layers as ours on its subset.

    python experiments/bench_scan.py                     # default sizes, 1 thread
    python experiments/bench_scan.py --sizes 4 16 --naive-texts 2 --out runs/bench
    python experiments/bench_scan.py --table-only --sizes 8 8 --threads 1   # the goals table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def matmul_rate(dtype, seconds: float = 3.0, device: str = "cpu") -> float:
    """GFLOP/s of an unembedding-shaped GEMM ([1024, 576] @ [576, 49152]) in ``dtype``."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 576, generator=g).to(device, dtype)
    w = torch.randn(576, 49152, generator=g).to(device, dtype)
    x @ w  # warm up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x @ w
        n += 1
    sync()
    return 2 * 1024 * 576 * 49152 * n / (time.perf_counter() - start) / 1e9


def forward_flops_per_token(model, n_ctx: int) -> float:
    """Matmul FLOPs of one token's forward pass (no final unembedding) at context ``n_ctx``."""
    cfg = model.cfg
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    kv = getattr(cfg, "n_key_value_heads", None) or h
    attn = 2 * d * (h * dh + 2 * kv * dh) + 2 * h * dh * d  # q, k, v, o projections
    attn += 2 * 2 * h * dh * (n_ctx / 2)  # scores and weighted sum, average causal length
    mlp = 2 * d * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    return cfg.n_layers * (attn + mlp)


def run_naive(model, texts, k: int, max_len: int):
    """001's public-code approach: full logits of every layer, full sorts, python loops."""
    import torch

    from beyond_top1 import hooked
    from beyond_top1.data import tokenize

    L = hooked.n_layers(model)
    all_s = []
    for text in texts:
        ids = tokenize(model, text, max_len=max_len, truncate=True)
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([ids]))
            hidden = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0] for l in range(L)])
            logits = hooked.unembed(model, hooked.final_norm(model, hidden))  # [L, pos, vocab]
            ranked = logits.argsort(dim=-1, descending=True)  # full sort per layer
        for p in range(len(ids)):
            s_row, ranks = [], []
            for i in range(k):
                final_token = int(ranked[L - 1, p, i])
                s = L - 1
                for l in range(L - 1, -1, -1):
                    if int(ranked[l, p, i]) != final_token:
                        break
                    s = l
                s_row.append(s)
                ranks.append([int((ranked[l, p] == final_token).nonzero()) + 1 for l in range(L)])
            all_s.append(s_row)
        del cache, hidden, logits, ranked
    return all_s


def _peak_rss_mb() -> float:
    """The process' peak resident memory (VmHWM), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> float:
    """Reset the peak-RSS mark to the current RSS (Linux ``clear_refs``); return it, MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _peak_rss_mb()


def worker(args) -> None:
    """One configuration in this process; prints one JSON line."""
    import torch

    import beyond_top1 as bt

    torch.set_num_threads(args.threads)
    model = bt.load_model(args.model, device=args.device)
    cuda = args.device.startswith("cuda")
    texts = bt.wiki_texts(args.n_texts, split="val", seed=0)
    n_tokens = bt.activations.count_scored_tokens(model, texts, max_len=args.max_len)

    def run(texts):
        """The method on ``texts``; the saturation layers where it gives them."""
        if args.method == "naive":
            return run_naive(model, texts, args.k, args.max_len)
        if args.method == "forward":
            layers = tuple(range(model.cfg.n_layers))
            for _ in bt.stream_residuals(
                model, texts, layers=layers, batch_size=args.batch_size, max_len=args.max_len,
                progress=False,
            ):  # fmt: skip
                pass
            return None
        if args.method == "tl4":
            from transformer_lens.tools.analysis import logit_lens

            from beyond_top1.data import iter_token_batches

            with torch.no_grad():
                for batch in iter_token_batches(
                    model, texts, batch_size=args.batch_size, max_len=args.max_len
                ):
                    logit_lens(model, batch.tokens, positions=None, top_k=args.k)
            return None
        precision, _, keep = args.method.partition("-")
        result = bt.scan(
            model,
            texts,
            k=args.k,
            max_len=args.max_len,
            batch_size=args.batch_size,
            precision=precision,
            keep="saturation" if keep == "sat" else "all",
            progress=False,
        )
        return result.saturation_array().tolist()

    if args.method != "naive":  # warm up on the same texts: compiled kernels, caches (not timed)
        run(texts)
    base_mb = _reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    s = run(texts)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    out = {
        "method": args.method,
        "n_texts": args.n_texts,
        "n_tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_second": n_tokens / seconds,
        "peak_rss_mb": peak_mb,
        "rss_before_mb": base_mb,
        "peak_added_mb": peak_mb - base_mb,
        "threads": torch.get_num_threads(),
        "device": args.device,
    }
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.save_s and s is not None:
        Path(args.save_s).write_text(json.dumps(s))
    print("RESULT " + json.dumps(out), flush=True)


def spawn(method: str, n_texts: int, args, save_s: str | None = None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--method",
        method,
        "--n-texts",
        str(n_texts),
        "--k",
        str(args.k),
        "--max-len",
        str(args.max_len),
        "--batch-size",
        str(args.batch_size),
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--device",
        args.device,
    ]
    if save_s:
        command += ["--save-s", save_s]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{method} x {n_texts} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sizes", type=int, nargs=2, default=[8, 32], help="two corpus sizes")
    parser.add_argument("--naive-texts", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="folder for bench_scan.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda when there is one, else cpu); on a GPU the FLOP "
        "bound and GEMM rates are the GPU's",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="only the goals table: TL 4.3, forward, full and saturation-only scans, one size",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--n-texts", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--save-s", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        worker(args)
        return

    import tempfile

    import torch

    import beyond_top1 as bt
    from beyond_top1.runtime import has_fast_bf16

    model = bt.load_model(args.model)  # also makes sure the conversion cache exists
    fp32_rate = matmul_rate(torch.float32, device=args.device)
    # without native bf16 a bf16 GEMM is ~100x slower than fp32 and the scan's bf16 path falls
    # back to fp32: neither is worth timing there
    args.bf16 = has_fast_bf16(args.device)
    bf16_rate = matmul_rate(torch.bfloat16, device=args.device) if args.bf16 else float("nan")
    L, d, vocab = model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab
    flops = forward_flops_per_token(model, args.max_len) + L * 2 * d * vocab
    bound = fp32_rate * 1e9 / flops
    print(f"fp32 GEMM {fp32_rate:.0f} GFLOP/s, bf16 GEMM {bf16_rate:.0f} GFLOP/s (measured now)")
    if not args.bf16:
        print(f"no fast bf16 GEMM on this {args.device}: the bf16 rows are left out")
    print(f"{flops / 1e9:.2f} GFLOP per token -> fp32 FLOP bound {bound:.1f} tokens/s")
    rows = []
    tmp = Path(tempfile.mkdtemp())
    if args.table_only:
        goals_table(args, tmp, bound)
        return
    if not args.bf16:
        raise SystemExit("the full benchmark compares bf16 with fp32: run --table-only here")
    for size in args.naive_texts:
        rows.append(spawn("naive", size, args, save_s=str(tmp / f"naive-{size}.json")))
        print(rows[-1])
    for size in args.sizes:
        for method in ("fp32", "bf16"):
            save = str(tmp / f"{method}-{size}.json")
            rows.append(spawn(method, size, args, save_s=save))
            print(rows[-1])
    check = spawn("fp32", args.naive_texts[-1], args, save_s=str(tmp / "check.json"))
    naive_s = json.loads((tmp / f"naive-{args.naive_texts[-1]}.json").read_text())
    ours_s = json.loads((tmp / "check.json").read_text())
    same_as_naive = naive_s == ours_s
    fp32_s = json.loads((tmp / f"fp32-{args.sizes[-1]}.json").read_text())
    bf16_s = json.loads((tmp / f"bf16-{args.sizes[-1]}.json").read_text())

    def tps(method, size):
        return next(r for r in rows if r["method"] == method and r["n_texts"] == size)[
            "tokens_per_second"
        ]

    big = args.sizes[-1]
    naive_tps = tps("naive", args.naive_texts[-1])
    summary = {
        "model": args.model,
        "fp32_gflops": fp32_rate,
        "bf16_gflops": bf16_rate,
        "gflop_per_token": flops / 1e9,
        "flop_bound_tokens_per_second": bound,
        "runs": rows,
        "ratio_fp32_vs_naive": tps("fp32", big) / naive_tps,
        "ratio_bf16_vs_naive": tps("bf16", big) / naive_tps,
        "fraction_of_fp32_flop_bound": tps("fp32", big) / bound,
        "bf16_fraction_of_fp32_flop_bound": tps("bf16", big) / bound,
        "ratio_bf16_vs_fp32": tps("bf16", big) / tps("fp32", big),
        "naive_and_ours_same_saturation": same_as_naive,
        "bf16_and_fp32_same_saturation": fp32_s == bf16_s,
        "check_run": check,
    }
    print()
    print(f"{'method':>6} {'texts':>5} {'tokens':>6} {'tok/s':>8} {'peak MB':>8} {'added':>7}")
    for r in rows:
        print(
            f"{r['method']:>6} {r['n_texts']:>5} {r['n_tokens']:>6} "
            f"{r['tokens_per_second']:>8.1f} {r['peak_rss_mb']:>8.0f} {r['peak_added_mb']:>7.0f}"
        )
    for key in (
        "ratio_fp32_vs_naive",
        "ratio_bf16_vs_naive",
        "fraction_of_fp32_flop_bound",
        "bf16_fraction_of_fp32_flop_bound",
        "ratio_bf16_vs_fp32",
        "naive_and_ours_same_saturation",
        "bf16_and_fp32_same_saturation",
    ):
        print(
            f"{key}: {summary[key]:.3f}"
            if isinstance(summary[key], float)
            else f"{key}: {summary[key]}"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_scan.json").write_text(json.dumps(summary, indent=1))


GOALS = {  # method: (goal vs TL 4.3 logit_lens, goal vs the forward pass: at most x its time)
    "fp32": (1.3, None),
    "bf16": (3.0, None),
    "fp32-sat": (3.0, 3.0),
    "bf16-sat": (5.0, 2.0),
}


def goals_table(args, tmp: Path, bound: float) -> None:
    """Issue 17's table: every row measured in this run, on the same texts and threads."""
    from beyond_top1.bridge import transformer_lens_major

    size = args.sizes[-1]
    methods = ["forward", "fp32", "bf16", "fp32-sat", "bf16-sat"]
    if not args.bf16:
        methods = [m for m in methods if not m.startswith("bf16")]
    if transformer_lens_major() >= 4:
        methods.insert(0, "tl4")
    runs = {m: spawn(m, size, args, save_s=str(tmp / f"{m}.json")) for m in methods}
    same = {
        m: json.loads((tmp / f"{m}.json").read_text())
        == json.loads((tmp / "fp32.json").read_text())
        for m in ("bf16", "fp32-sat", "bf16-sat")
        if m in runs
    }
    tl = runs.get("tl4", {}).get("tokens_per_second")
    forward = runs["forward"]["seconds"]
    print(
        f"\n{size} texts x <= {args.max_len} tokens, {runs['fp32']['n_tokens']} scored tokens, "
        f"k={args.k}, {args.threads} thread(s); FLOP bound (forward + full read-out, fp32): "
        f"{bound:.1f} tokens/s"
    )
    print(
        f"{'read-out':>10} {'tok/s':>8} {'peak MB':>8} {'vs TL 4.3':>10} {'goal':>6} "
        f"{'time / forward':>15} {'goal':>6} {'same s':>7}"
    )
    for m, r in runs.items():
        vs_tl = f"{r['tokens_per_second'] / tl:.2f}x" if tl else "-"
        goal_tl, goal_fw = GOALS.get(m, (None, None))
        print(
            f"{m:>10} {r['tokens_per_second']:>8.1f} {r['peak_rss_mb']:>8.0f} {vs_tl:>10} "
            f"{(f'>={goal_tl}x' if goal_tl else ''):>6} {r['seconds'] / forward:>14.2f}x "
            f"{(f'<={goal_fw}x' if goal_fw else ''):>6} {str(same.get(m, '')):>7}"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        summary = {"runs": runs, "same_saturation_as_fp32": same, "flop_bound": bound}
        (Path(args.out) / "bench_scan_goals.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
