"""The fused kernel against plain loops, and the resumable scan (the exact rule itself:
test_readout_exact.py)."""

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


def test_compiled_passes_equal_eager_and_loops():
    g = torch.Generator().manual_seed(0)
    tokens, vocab = 33, 3 * ranking.BLOCK + 11  # a short last block
    logits = torch.randn(tokens, vocab, generator=g)
    thresholds = logits[:, :4].contiguous()
    row_scale, col_norm = torch.rand(tokens, 1, generator=g), torch.rand(vocab, generator=g)
    args = (logits, thresholds, row_scale * 1e-3, col_norm, -1.0)
    counts, lse, spread, blocks = ranking._kernel("fp32")(*args)
    ref = ranking._pass_fp32(*args)
    assert torch.equal(counts, ref[0])
    for got, want in zip((lse, spread, blocks), ref[1:], strict=True):
        torch.testing.assert_close(got, want)
    err = (row_scale * 1e-3 * col_norm + 2.0**-23 * logits.abs()).double() * (1 + 2.0**-12)
    upper = logits.double() + err
    for t in range(tokens):  # against plain loops
        assert counts[t].tolist() == [int((logits[t] > c).sum()) for c in thresholds[t]]
        expected = [float(upper[t, b : b + ranking.BLOCK].max()) for b in range(0, vocab, 64)]
        torch.testing.assert_close(blocks[t].double(), torch.tensor(expected, dtype=torch.float64))
        p = logits[t].double().softmax(-1)
        torch.testing.assert_close(spread[t].double(), (p * (err[t] + err[t] ** 2)).sum())
    torch.testing.assert_close(lse, logits.logsumexp(-1))
    bias = torch.randn(vocab, generator=g)
    terms = (torch.rand(tokens, 1, generator=g), torch.rand(tokens, 1, generator=g))
    terms += (torch.rand(vocab, generator=g), torch.rand(vocab, generator=g))
    args16 = (logits.bfloat16(), bias, thresholds, *terms, -1.0)
    got = ranking._kernel("bf16")(*args16)
    ref = ranking._pass_bf16(*args16)
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b)


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
    expected_s = bt.stats.saturation_layers(torch.as_tensor(result.top_ids)).numpy()
    np.testing.assert_array_equal(result.saturation_array(), expected_s)
    # the final top-k are the model's own top-k for text 1
    ids = bt.tokenize(tiny_model, TEXTS[1])[:16]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids]))[0]
    rows = frame.text_id == 1
    assert frame.loc[rows, "pos"].tolist() == list(range(1, len(ids)))  # position 0 left out
    top = logits[1:].argsort(-1, descending=True)[:, :4].numpy()
    np.testing.assert_array_equal(frame.loc[rows, [f"top_{i}_id" for i in range(1, 5)]], top)
    assert (frame.loc[rows, "next_token_id"].to_numpy()[:-1] == ids[2:]).all()


def test_scan_writes_identical_files_and_resumes(tiny_model, tmp_path, monkeypatch):
    import beyond_top1.scans.result as result_module

    monkeypatch.setattr(result_module, "ROW_GROUP_ROWS", 7)  # several row groups to read lazily
    kwargs = dict(k=3, batch_size=2, max_len=12, progress=False, shard_batches=1)
    full = scan(tiny_model, TEXTS, out=tmp_path / "full", **kwargs)
    again = scan(tiny_model, TEXTS, out=tmp_path / "again", **kwargs)
    for name in ("saturation.parquet", "trajectories.safetensors", "summary.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert again.saturation.equals(full.saturation)

    import beyond_top1.scans.run as scan_module

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
    # the folder read lazily: the same table, and the same ordering statistics streamed
    from beyond_top1.scans import scan_dataset, scan_ordering

    dataset = scan_dataset(tmp_path / "resumed")
    assert len(list(dataset.to_batches(batch_size=7))) == -(-len(full) // 7) > 2
    assert dataset.to_table().to_pandas().equals(full.saturation)
    streamed = scan_ordering(tmp_path / "resumed", n_permutations=40, seed=2)
    assert streamed.summary() == full.ordering(n_permutations=40, seed=2).summary()


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
    with pytest.raises(ScanFileError, match="beyond-top1 did not write"):
        scan(tiny_model, TEXTS, out=tmp_path / "junk", progress=False)
    with pytest.raises(ScanFileError, match="no scan folder"):
        load_scan(tmp_path / "missing")
