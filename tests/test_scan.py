"""The top-k kernel against full-sort references, the bf16 fast path, and the resumable scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

import beyond_top1 as bt
from beyond_top1 import ranking
from beyond_top1.scans import ScanFileError, load_scan, scan

TEXTS = [
    "The river flows through the old town and into the sea.",
    "Paris is the capital and largest city of France.",
    "A computer program is a sequence of instructions for a computer to execute.",
    "The cat sat on the mat.",
    "Mathematics is the study of numbers, shapes and patterns.",
    "In 1969, astronauts landed on the Moon for the first time.",
    "Music is the arrangement of sound.",
]


@pytest.fixture(scope="module")
def small_vocab_model():
    return make_tiny_model(n_layers=4, d_model=32, d_vocab=97, seed=3)


def reference_readout(lens, resid, k):
    """Full sort of the vocabulary, python loops over layers: obviously correct, slow."""
    n_layers = resid.shape[1]
    logits = [lens(resid[:, l], l).double() for l in range(n_layers)]
    order = [torch.sort(x, dim=-1, descending=True, stable=True).indices for x in logits]
    final = order[-1][:, :k]
    ranks = torch.stack(
        [
            (x[:, :, None] > x.gather(-1, final)[:, None, :]).sum(1) + 1
            for x in logits  # rank = 1 + entries strictly greater
        ],
        dim=1,
    )
    top = torch.stack([o[:, :k] for o in order], dim=1)
    logprobs = torch.stack(
        [x.log_softmax(-1).gather(-1, o[:, :k]) for x, o in zip(logits, order, strict=True)], 1
    )
    return top, ranks, logprobs


@pytest.mark.parametrize("k", [1, 3, 10])
def test_lens_topk_matches_full_sort(small_vocab_model, k):
    model = small_vocab_model
    L = model.cfg.n_layers
    resid = 3 * torch.randn(40, L, model.cfg.d_model, generator=torch.Generator().manual_seed(k))
    got = ranking.lens_topk(bt.LogitLens(model), resid, range(L), k)
    top, ranks, logprobs = reference_readout(bt.LogitLens(model), resid, k)
    assert torch.equal(got.top_ids, top)
    assert torch.equal(got.final_ranks, ranks)
    torch.testing.assert_close(got.top_logprobs.double(), logprobs, atol=1e-5, rtol=0)


def test_compiled_passes_equal_eager_and_loops():
    g = torch.Generator().manual_seed(0)
    tokens, vocab = 33, 3 * ranking.BLOCK + 11  # a short last block
    logits = torch.randn(tokens, vocab, generator=g)
    thresholds = logits[:, :4].contiguous()
    counts, lse, blocks = ranking._kernel("fp32")(logits, thresholds)
    ref_counts, ref_lse, ref_blocks = ranking._pass_fp32(logits, thresholds)
    assert torch.equal(counts, ref_counts) and torch.equal(blocks, ref_blocks)
    torch.testing.assert_close(lse, ref_lse)
    for t in range(tokens):  # against plain loops
        assert counts[t].tolist() == [int((logits[t] > c).sum()) for c in thresholds[t]]
        expected = [float(logits[t, b : b + ranking.BLOCK].max()) for b in range(0, vocab, 64)]
        assert blocks[t].tolist() == expected
    torch.testing.assert_close(lse, logits.logsumexp(-1))
    bias = torch.randn(vocab, generator=g)
    bound = (torch.rand(tokens, generator=g), torch.rand(tokens, generator=g))
    bound += (torch.rand(vocab, generator=g), torch.rand(vocab, generator=g))
    got = ranking._kernel("bf16")(logits.bfloat16(), bias, thresholds, *bound)
    ref = ranking._pass_bf16(logits.bfloat16(), bias, thresholds, *bound)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2])


def test_bf16_upper_bounds_hold():
    """Every bound is >= the fp32 path's logit, including outlier columns and large inputs."""
    g = torch.Generator().manual_seed(1)
    d, vocab = 576, 3000
    weight = torch.randn(d, vocab, generator=g) * 0.1
    weight[:, :20] *= 8  # outlier columns
    bias = torch.randn(vocab, generator=g)
    x = torch.randn(64, d, generator=g) * torch.logspace(-1, 1.5, 64)[:, None]
    x[:, :3] *= 30  # outlier dimensions
    emb = ranking._Unembedding.of_tensors(weight, bias, "bf16")
    exact = ranking._logits(x, weight, bias)
    x16 = x.to(torch.bfloat16)
    gamma = 1.01 * d * ranking._FP32_UNIT
    row_err = ((x - x16.float()).norm(dim=-1) + gamma * x16.float().norm(dim=-1)) * 1.001
    upper = ranking._upper_bound(
        x16 @ emb.weight16,
        bias,
        row_err[:, None],
        x.norm(dim=-1)[:, None] * 1.001,
        emb.col_norm16,
        emb.col_error,
    )
    assert (upper >= exact).all()
    # ... and is of the order of bf16 rounding, not vacuous: well below 4u·‖x‖·‖W_j‖
    scale = x.norm(dim=-1)[:, None] * weight.norm(dim=0)[None, :]
    assert ((upper - exact) / scale).median() < 4 * 2.0**-8


def test_gathered_logits_equal_the_full_product_bit_for_bit():
    """The bf16 path's exactness rests on BLAS giving subsets of a GEMM the same bits."""
    g = torch.Generator().manual_seed(2)
    d, vocab = 576, 5000
    weight, bias = torch.randn(d, vocab, generator=g) * 0.1, torch.randn(vocab, generator=g)
    emb = ranking._Unembedding.of_tensors(weight, bias, "bf16")
    for tokens in (1, 5, 150):  # a single row, a small chunk, a full chunk plus a small one
        x = torch.randn(tokens, d, generator=g)
        full = ranking._logits(x, weight, bias)
        for n in (1, 7, 40):
            ids = torch.randint(0, vocab, (tokens, n), generator=g)
            assert torch.equal(ranking._gathered_logits(x, emb, ids), full.gather(-1, ids))


@pytest.mark.parametrize("n_candidates", [8, 32])
def test_bf16_path_equals_fp32(small_vocab_model, tiny_model, n_candidates):
    for model in (small_vocab_model, tiny_model):
        L = model.cfg.n_layers
        resid = 2 * torch.randn(
            50, L, model.cfg.d_model, generator=torch.Generator().manual_seed(7)
        )
        fp32 = ranking.lens_topk(bt.LogitLens(model), resid, range(L), 5)
        fast = ranking.lens_topk(
            bt.LogitLens(model), resid, range(L), 5, precision="bf16", n_candidates=n_candidates
        )
        assert torch.equal(fast.top_ids, fp32.top_ids)
        assert fast.n_exact_rows + fast.n_fallback_rows == 50 * L
        in_top = fp32.final_ranks <= 5
        assert torch.equal(fast.final_ranks[in_top], fp32.final_ranks[in_top])
        assert (fast.final_ranks[~in_top] > 5).all()
        torch.testing.assert_close(fast.top_logprobs, fp32.top_logprobs, atol=0.05, rtol=0)


def test_lens_topk_errors(small_vocab_model):
    model = small_vocab_model
    resid = torch.randn(3, 4, model.cfg.d_model)
    lens = bt.LogitLens(model)
    with pytest.raises(ValueError, match="vocabulary size 97"):
        ranking.lens_topk(lens, resid, range(4), 98)
    with pytest.raises(ValueError, match="end with the last layer"):
        ranking.lens_topk(lens, resid, [0, 1, 2, 2], 3)
    with pytest.raises(ValueError, match="precision"):
        ranking.lens_topk(lens, resid, range(4), 3, precision="fp8")


# ---------------------------------------------------------------------------------------------
# scan
# ---------------------------------------------------------------------------------------------


def test_scan_matches_stream_and_model(tiny_model):
    result = scan(tiny_model, TEXTS, k=4, batch_size=3, max_len=16, progress=False)
    L = tiny_model.cfg.n_layers
    frame = result.saturation
    positions = []
    for batch in bt.stream_residuals(tiny_model, TEXTS, batch_size=3, max_len=16, progress=False):
        positions += list(zip(batch.text_ids.tolist(), batch.positions.tolist(), strict=True))
    assert list(zip(frame.text_id, frame.pos, strict=True)) == positions
    assert result.top_ids.shape == (len(frame), L, 4) and result.resid_cos.shape == (len(frame), L)
    # s_i follow from the stored top-k trajectories
    expected_s = bt.saturation_layers(torch.as_tensor(result.top_ids)).numpy()
    np.testing.assert_array_equal(result.saturation_array(), expected_s)
    # the final top-k are the model's own top-k for text 1
    ids = bt.tokenize(tiny_model, TEXTS[1])[:16]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids]))[0]
    rows = frame.text_id == 1
    top = logits.argsort(-1, descending=True)[:, :4].numpy()
    np.testing.assert_array_equal(frame.loc[rows, [f"top_{i}_id" for i in range(1, 5)]], top)
    assert (frame.loc[rows, "next_token_id"].to_numpy()[:-1] == ids[1:]).all()


def test_scan_writes_identical_files_and_resumes(tiny_model, tmp_path, monkeypatch):
    kwargs = dict(k=3, batch_size=2, max_len=12, progress=False, shard_batches=1)
    full = scan(tiny_model, TEXTS, out=tmp_path / "full", **kwargs)
    again = scan(tiny_model, TEXTS, out=tmp_path / "again", **kwargs)
    for name in ("saturation.parquet", "trajectories.safetensors", "summary.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert again.saturation.equals(full.saturation)

    import beyond_top1.scans as scan_module

    real = scan_module._scan_batch
    calls = {"n": 0}

    def dies_on_third_batch(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(scan_module, "_scan_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, TEXTS, out=tmp_path / "resumed", **kwargs)
    assert len(list((tmp_path / "resumed" / "shards").iterdir())) == 2
    with pytest.raises(ScanFileError, match="resume"):
        scan(tiny_model, TEXTS, out=tmp_path / "resumed", **kwargs)
    with pytest.raises(ScanFileError, match="k differ"):
        scan(tiny_model, TEXTS, out=tmp_path / "resumed", resume=True, **{**kwargs, "k": 4})
    calls["n"] = -100
    scan(tiny_model, TEXTS, out=tmp_path / "resumed", resume=True, **kwargs)
    assert calls["n"] == -100 + 2  # 4 batches in all, 2 were done before the kill
    for name in ("saturation.parquet", "trajectories.safetensors", "summary.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    loaded = load_scan(tmp_path / "resumed")
    assert loaded.saturation.equals(full.saturation)
    np.testing.assert_array_equal(loaded.final_ranks, full.final_ranks)
    assert loaded.settings["k"] == 3


def test_scan_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="vocabulary size"):
        scan(tiny_model, TEXTS, k=10**6, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        scan(tiny_model, [], progress=False)
    other = make_tiny_model(seed=5)
    with pytest.raises(ValueError, match="another model"):
        scan(tiny_model, TEXTS, lens=bt.LogitLens(other), progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ScanFileError, match="not a scan folder"):
        scan(tiny_model, TEXTS, out=tmp_path / "junk", progress=False)
    with pytest.raises(ScanFileError, match="no scan folder"):
        load_scan(tmp_path / "missing")


def test_bf16_scan_equals_fp32_on_the_trained_model(smollm2):
    texts = bt.wiki_texts(4, split="val")
    fp32 = scan(smollm2, texts, k=5, max_len=48, progress=False)
    fast = scan(smollm2, texts, k=5, max_len=48, precision="bf16", progress=False)
    np.testing.assert_array_equal(fast.top_ids, fp32.top_ids)
    assert fast.saturation.equals(fp32.saturation)
