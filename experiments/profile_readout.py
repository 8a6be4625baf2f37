"""Where a scan's time goes: the forward pass vs. the lens read-out, fp32 vs. bf16.

Times, on the same validation texts, the residual stream alone (``stream_residuals``) and the
whole scan in each precision, and reports the read-out's share per token; then profiles the
bf16 read-out of one batch (``lens_topk`` on every layer) with the torch profiler.

    python experiments/profile_readout.py --texts 32
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", type=int, default=32, help="validation texts")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--rows", type=int, default=12, help="profiler table rows")
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    import beyond_top1 as bt
    from beyond_top1.activations import count_scored_tokens
    from beyond_top1.ranking import lens_topk

    model = bt.load_model(args.model)
    texts = bt.wiki_texts(args.texts, split="val")
    n = count_scored_tokens(model, texts, max_len=args.max_len)
    start = time.perf_counter()
    for _ in bt.stream_residuals(model, texts, max_len=args.max_len, progress=False):
        pass
    forward = time.perf_counter() - start
    print(f"{n} tokens; forward + residual stream: {forward / n * 1e3:.2f} ms/token")
    for precision in ("fp32", "bf16"):
        bt.scan(model, texts[:8], max_len=args.max_len, precision=precision, progress=False)
        start = time.perf_counter()  # (after a warm-up scan: compiled kernels are ready)
        bt.scan(model, texts, max_len=args.max_len, precision=precision, progress=False)
        total = time.perf_counter() - start
        print(
            f"scan {precision}: {n / total:.1f} tokens/s; read-out "
            f"{(total - forward) / n * 1e3:.2f} ms/token"
        )

    lens = bt.LogitLens(model)
    batch = next(iter(bt.stream_residuals(model, texts, max_len=args.max_len, progress=False)))
    layers = tuple(range(model.cfg.n_layers))
    lens_topk(lens, batch.resid, layers, 5, precision="bf16")  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lens_topk(lens, batch.resid, layers, 5, precision="bf16")
    print(f"bf16 read-out of one batch ({len(batch)} tokens, {len(layers)} layers):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
