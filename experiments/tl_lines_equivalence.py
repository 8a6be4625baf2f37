"""The two TransformerLens lines give the same results, and agree with TL 4.3's logit lens.

Run ``dump`` once in each environment (the default ``.venv`` has TransformerLens 4, ``.venv-tl3``
has 3.9; see ``TL_LINE`` in scripts/setup.sh), then ``compare`` the two folders::

    .venv/bin/python experiments/tl_lines_equivalence.py dump --out runs/equiv/tl4
    .venv-tl3/bin/python experiments/tl_lines_equivalence.py dump --out runs/equiv/tl3
    .venv/bin/python experiments/tl_lines_equivalence.py compare runs/equiv/tl3 runs/equiv/tl4
    .venv/bin/python experiments/tl_lines_equivalence.py margins runs/equiv/tl3 runs/equiv/tl4
    .venv-tl3/bin/python experiments/tl_lines_equivalence.py margins runs/equiv/tl3 runs/equiv/tl4

``dump`` records, on SmolLM2 and ``--n-texts`` validation texts: a k = 5 logit-lens scan
(saturation layers and top-k ids at every layer), a linear-shortcut lens fitted on as many
training texts, the per-layer metrics of both lenses, and the logits of one fixed patching
intervention. On TransformerLens 4 it also runs TL's own
``transformer_lens.tools.analysis.logit_lens(model, tokens, positions=None, top_k=5)`` on the
same token ids and compares its top-5 ids with the scan's at every layer and position.
``margins`` prints, for every (position, layer) whose top-5 differs (between the lines, or
between our scan and TL's logit lens), the float64 logits of the tokens that swapped, read from
this environment's residual stream.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import beyond_top1 as bt
from beyond_top1 import hooked
from beyond_top1.data import tokenize
from beyond_top1.hooks import copy_position

PATCH = {"layer": 10, "text": 0, "source": 2, "target": 8}


def dump(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bt.load_model(args.model)
    texts = bt.wiki_texts(args.n_texts, split="val")
    stream = {"max_len": args.max_len, "progress": False, "score_first": True}
    scan = bt.scan(model, texts, k=5, **stream)
    lens = bt.LinearShortcutLens.fit(model, bt.wiki_texts(args.n_texts, split="train"), **stream)
    metrics = bt.evaluate_lenses(model, {"logit": bt.LogitLens(model), "linear": lens}, texts,
                                 **stream)  # fmt: skip
    tokens = torch.tensor([tokenize(model, texts[PATCH["text"]])[: args.max_len]])
    hook = copy_position(PATCH["source"], PATCH["target"])
    with torch.no_grad():
        patched = model.run_with_hooks(
            tokens, fwd_hooks=[(hooked.resid_hook_name(PATCH["layer"]), hook)]
        )
    np.savez(
        out / "results.npz",
        saturation=scan.saturation_array(),
        top_ids=scan.top_ids,
        text_id=scan.saturation["text_id"].to_numpy(),
        pos=scan.saturation["pos"].to_numpy(),
        linear_weight=lens.weight.double().numpy(),
        patched_logits=patched[0].double().numpy(),
    )
    metrics.to_csv(out / "metrics.csv", index=False)
    info = {
        "transformer_lens": metadata.version("transformer-lens"),
        "model_class": type(model).__name__,
        "positions": len(scan),
    }
    if hooked.is_bridge(model):
        info["tl_logit_lens"] = _against_tl_logit_lens(model, texts, scan, args.max_len)
    (out / "info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def _against_tl_logit_lens(model, texts, scan, max_len: int) -> dict:
    """TL 4.3's logit lens top-5 vs the scan's, at every layer and position (TL's stack entry
    ``i`` is the input of block ``i``: entry ``l + 1`` is our layer ``l``)."""
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    L = hooked.n_layers(model)
    compared = differ = 0
    examples = []
    for text_id, text in enumerate(texts):
        ids = torch.tensor([tokenize(model, text)[:max_len]])
        with torch.no_grad():
            result = logit_lens(model, ids, positions=None, top_k=5)
        theirs = result.readout.top_ids[1 : L + 1, 0].permute(1, 0, 2).numpy()  # [pos, L, 5]
        ours = scan.top_ids[scan.saturation["text_id"].to_numpy() == text_id]
        compared += ours.shape[0] * L
        rows = np.flatnonzero((theirs != ours).any(-1).reshape(-1))
        differ += len(rows)
        for row in rows[:3]:
            pos, layer = divmod(int(row), L)
            examples.append({"text": text_id, "pos": pos, "layer": layer,
                             "ours": ours[pos, layer].tolist(),
                             "tl": theirs[pos, layer].tolist()})  # fmt: skip
    return {"rows_compared": compared, "rows_differing": differ, "examples": examples[:10]}


def compare(args) -> dict:
    a, b = (np.load(Path(d) / "results.npz") for d in (args.first, args.second))
    info = [json.loads((Path(d) / "info.json").read_text()) for d in (args.first, args.second)]
    ma, mb = (pd.read_csv(Path(d) / "metrics.csv") for d in (args.first, args.second))
    numeric = [c for c in ma.columns if ma[c].dtype.kind == "f"]
    keys = [c for c in ma.columns if c not in numeric]
    joined = ma.merge(mb, on=keys, suffixes=("_a", "_b"))
    metric_diff = max(float((joined[f"{c}_a"] - joined[f"{c}_b"]).abs().max()) for c in numeric)
    weight_scale = float(np.abs(a["linear_weight"]).max())
    logits_a, logits_b = a["patched_logits"], b["patched_logits"]
    summary = {
        "lines": [i["transformer_lens"] for i in info],
        "positions": int(len(a["saturation"])),
        "saturation_identical": bool(np.array_equal(a["saturation"], b["saturation"])),
        "top_ids_identical": bool(np.array_equal(a["top_ids"], b["top_ids"])),
        "top_ids_rows_differing": int((a["top_ids"] != b["top_ids"]).any(-1).sum()),
        "metrics_rows": len(joined),
        "metrics_max_abs_diff": metric_diff,
        "linear_weight_max_abs_diff": float(np.abs(a["linear_weight"] - b["linear_weight"]).max()),
        "linear_weight_max_abs": weight_scale,
        "patched_logits_max_abs_diff": float(np.abs(logits_a - logits_b).max()),
        "patched_logprobs_max_abs_diff": float(
            np.abs(_log_softmax(logits_a) - _log_softmax(logits_b)).max()
        ),
        "patched_argmax_identical": bool(np.array_equal(logits_a.argmax(-1), logits_b.argmax(-1))),
        "tl_logit_lens": next((i["tl_logit_lens"] for i in info if "tl_logit_lens" in i), None),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def margins(args) -> None:
    """Float64 logits of the swapped tokens of every differing row, on this line's residuals."""
    a, b = (np.load(Path(d) / "results.npz") for d in (args.first, args.second))
    info = json.loads((Path(args.second) / "info.json").read_text())
    cases = []
    for r, l in np.argwhere((a["top_ids"] != b["top_ids"]).any(-1)):
        where = (int(a["text_id"][r]), int(a["pos"][r]), int(l))
        cases.append(("lines", *where, a["top_ids"][r, l], b["top_ids"][r, l]))
    for e in (info.get("tl_logit_lens") or {}).get("examples", []):
        cases.append(("tl-logit-lens", e["text"], e["pos"], e["layer"], e["ours"], e["tl"]))
    model = bt.load_model(args.model)
    texts = bt.wiki_texts(args.n_texts, split="val")
    for kind, text, pos, layer, x, y in cases:
        ids = torch.tensor([tokenize(model, texts[text])[: args.max_len]])
        resid = hooked.run_with_residuals(model, ids, (layer,))[0, pos, 0].double()
        normed = hooked.final_norm(model, resid).double()
        logits = normed @ hooked.unembedding(model)[0].double() + model.b_U.double()
        swapped = sorted({int(t) for t, u in zip(x, y, strict=True) if t != u} |
                         {int(u) for t, u in zip(x, y, strict=True) if t != u})  # fmt: skip
        values = {t: round(float(logits[t]), 9) for t in swapped}
        gap = max(values.values()) - min(values.values())
        print(
            f"{type(model).__name__} {kind}: text {text} pos {pos} layer {layer}: "
            f"{list(map(int, x))} vs {list(map(int, y))}; logits {values}; gap {gap:.2e}"
        )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="record this environment's results")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--n-texts", type=int, default=40)
    d.add_argument("--max-len", type=int, default=64)
    d.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("first")
    c.add_argument("second")
    c.add_argument("--out", help="also write the summary (JSON) here")
    m = sub.add_parser("margins", help="explain differing rows (float64 logits)")
    m.add_argument("first")
    m.add_argument("second")
    m.add_argument("--model", default="smollm2-135m")
    m.add_argument("--n-texts", type=int, default=40)
    m.add_argument("--max-len", type=int, default=64)
    args = p.parse_args(argv)
    {"dump": dump, "compare": compare, "margins": margins}[args.command](args)


if __name__ == "__main__":
    main()
