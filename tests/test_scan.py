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
    import beyond_top1.scans.files as files_module

    monkeypatch.setattr(files_module, "ROW_GROUP_ROWS", 7)  # several row groups to read lazily
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


def test_files_do_not_depend_on_batching_and_load_lazily(tiny_model, tmp_path, monkeypatch):
    """A scan written from its shards batch by batch and the same scan saved whole from memory
    are the same bytes; the arrays file is a valid safetensors file (read back by the
    safetensors library) and ``load_scan`` memory-maps it copy-on-write."""
    import safetensors.numpy

    import beyond_top1.scans.files as files_module
    from beyond_top1.safetensors_file import map_safetensors, save_arrays

    monkeypatch.setattr(files_module, "ROW_GROUP_ROWS", 5)  # row groups straddle the batches
    kwargs = dict(k=3, batch_size=2, max_len=12, progress=False)
    streamed = scan(tiny_model, TEXTS, out=tmp_path / "streamed", shard_batches=1, **kwargs)
    whole = scan(tiny_model, TEXTS, **kwargs)
    whole.settings["shard_batches"] = 1  # (the settings of the run that wrote `streamed`)
    whole.save(tmp_path / "whole")
    for name in ("saturation.parquet", "trajectories.safetensors", "summary.json", "texts.jsonl"):
        written = [(tmp_path / folder / name).read_bytes() for folder in ("streamed", "whole")]
        assert written[0] == written[1], name

    path = tmp_path / "streamed" / "trajectories.safetensors"
    by_library = safetensors.numpy.load_file(str(path))
    assert sorted(by_library) == ["final_ranks", "resid_cos", "top_ids", "top_logprobs"]
    for name, array in by_library.items():
        np.testing.assert_array_equal(array, getattr(whole, name))
        assert array.dtype == getattr(whole, name).dtype
    assert isinstance(streamed.top_ids, np.memmap)
    streamed.top_ids[0, 0, 0] = -7  # a private copy: the file keeps its bytes
    assert load_scan(tmp_path / "streamed").top_ids[0, 0, 0] == whole.top_ids[0, 0, 0] != -7

    empty = whole.subset(np.zeros(len(whole), dtype=bool))  # no positions at all
    assert len(load_scan(empty.save(tmp_path / "empty"))) == 0
    assert load_scan(tmp_path / "empty").top_ids.shape == (0, whole.n_layers, 3)

    # every tensor starts aligned to its item size, whatever the odd lengths before it
    odd = {"a": np.ones((3, 1), np.int16), "b": np.ones(5, np.float64), "c": np.ones(1, np.int32)}
    save_arrays(tmp_path / "odd.safetensors", odd)
    mapped = map_safetensors(tmp_path / "odd.safetensors")
    assert all(mapped[name].flags.aligned for name in odd)
    # a file written by the safetensors library (scans saved before this writer) maps too
    legacy = {"a": np.arange(12, dtype=np.int32).reshape(3, 4), "b": np.zeros((0, 2), np.float32)}
    safetensors.numpy.save_file(legacy, str(tmp_path / "legacy.safetensors"))
    mapped = map_safetensors(tmp_path / "legacy.safetensors")
    np.testing.assert_array_equal(mapped["a"], legacy["a"])
    assert mapped["b"].shape == (0, 2)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        map_safetensors(tmp_path / "bad.safetensors")


def test_writing_a_scan_holds_one_piece_at_a_time(tmp_path):
    """Memory while writing is flat in the number of positions: 60 pieces of 1,000 positions
    (~108 MB of arrays in all, never built whole) are written with a peak of a few pieces."""
    import tracemalloc

    import pandas as pd

    from beyond_top1.fileio import OutputFolder
    from beyond_top1.scans import ScanResult
    from beyond_top1.scans.files import write_scan_files

    n, L, k, n_pieces = 1000, 30, 5, 60
    settings = {"n_layers": L, "k": k, "model_name": "synthetic"}

    def piece(i):
        g = np.random.default_rng(i)
        frame = pd.DataFrame({"text_id": np.full(n, i), "pos": np.arange(n)})
        for j in range(1, k + 1):
            frame[f"s_{j}"] = g.integers(0, L, n)
        ids = g.integers(0, 50, (n, L, k)).astype(np.int32)
        return ScanResult(frame, ids, ids + 1, ids.astype(np.float32), ids[:, :, 0] * 0.5, settings)

    one_piece = sum(a.nbytes for a in (piece(0).top_ids,) * 3) + piece(0).resid_cos.nbytes
    with OutputFolder(tmp_path / "big", "scan") as folder:
        tracemalloc.start()
        write_scan_files(folder, lambda: (piece(i) for i in range(n_pieces)), settings, None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(f"peak {peak / 1e6:.1f} MB, one piece {one_piece / 1e6:.1f} MB")
    assert peak < 8 * one_piece < n_pieces * one_piece / 5, (peak, one_piece)
    loaded = load_scan(tmp_path / "big")
    assert len(loaded) == n * n_pieces
    np.testing.assert_array_equal(loaded.top_ids[-n:], piece(n_pieces - 1).top_ids)
    np.testing.assert_array_equal(loaded.resid_cos[:n], piece(0).resid_cos)
    s = np.concatenate([piece(i).saturation_array() for i in range(n_pieces)])
    summary = __import__("json").loads((tmp_path / "big" / "summary.json").read_text())
    assert summary["mean_saturation_layer"] == s.mean(0).tolist()
    assert summary["n_positions"] == n * n_pieces and summary["n_texts_with_positions"] == n_pieces
