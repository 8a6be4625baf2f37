"""The saturation-only read-out (``keep="saturation"``): read from the last layer down, only rows
still in an unbroken run, it must give the full read-out's ``s`` and final top-k exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import beyond_top1 as bt
from beyond_top1.activations import stream_residuals
from beyond_top1.ranking import lens_saturation, lens_topk
from beyond_top1.saturation import saturation_layers
from beyond_top1.scans import TRAJECTORIES_FILE


def _full(lens, resid, k, precision="fp32"):
    readout = lens_topk(lens, resid, tuple(range(resid.shape[1])), k, precision=precision)
    return readout.final_ids, saturation_layers(readout.top_ids)


@pytest.fixture(scope="module")
def smollm2_resid(smollm2):
    batch = next(
        iter(
            stream_residuals(
                smollm2,
                bt.wiki_texts(4, split="val"),
                layers=tuple(range(smollm2.cfg.n_layers)),
                batch_size=4,
                max_len=32,
                progress=False,
            )
        )
    )
    return batch.resid


@pytest.mark.parametrize(("precision", "k"), [("fp32", 1), ("fp32", 5), ("fp32", 10), ("bf16", 5)])
def test_saturation_only_equals_the_full_read_out_on_real_texts(
    smollm2, smollm2_resid, precision, k, monkeypatch
):
    monkeypatch.setenv("BEYOND_TOP1_BF16", "emulate")  # the bf16 path, also on AVX2-only CPUs
    lens = bt.LogitLens(smollm2)
    final_ids, s = _full(lens, smollm2_resid, k, precision)
    only = lens_saturation(lens, smollm2_resid, k, precision=precision)
    assert only.precision == precision
    torch.testing.assert_close(only.final_ids, final_ids, rtol=0, atol=0)
    torch.testing.assert_close(only.s, s, rtol=0, atol=0)
    n, L = smollm2_resid.shape[:2]
    assert n * 2 <= only.rows_read < n * L / 2  # most rows stop after a few layers
    assert len(torch.unique(s)) >= 5  # varied saturation layers, not a trivial case


def test_constructed_runs_saturate_where_the_full_read_out_says(smollm2, smollm2_resid):
    """Layer stacks built from two residuals: ``F`` (a position's last layer) reads as the final
    top-k, ``D`` (another position's) does not. Patterns: F everywhere (s = 0), D just below the
    top (s = L-1), runs that break and resume, random mixtures; k = 1 and 10."""
    lens = bt.LogitLens(smollm2)
    L = smollm2_resid.shape[1]
    final = smollm2_resid[:, -1]
    top1 = lens_topk(lens, final[:, None].expand(-1, L, -1), tuple(range(L)), 1).final_ids[:, 0]
    f, d = 3, int(np.flatnonzero(top1.numpy() != top1[3].item())[0])
    F, D = final[f], final[d]
    patterns = [
        [F] * L,  # s = 0
        [F] * (L - 2) + [D, F],  # s = L-1 where D's ranks differ
        [F] * 10 + [D] * 10 + [F] * 10,  # broken, resumed: s = 20
        [D] * 5 + [F] * (L - 5),  # s = 5
    ]
    rng = np.random.default_rng(0)
    for _ in range(12):
        patterns.append([F if x else D for x in rng.random(L) < 0.8])
    for pattern in patterns:
        pattern[-1] = F
    resid = torch.stack([torch.stack(p) for p in patterns])  # [rows, L, d]
    for k in (1, 10):
        final_ids, s = _full(lens, resid, k)
        only = lens_saturation(lens, resid, k)
        torch.testing.assert_close(only.s, s, rtol=0, atol=0)
        torch.testing.assert_close(only.final_ids, final_ids, rtol=0, atol=0)
        assert (s[0] == 0).all() and s[1, 0] == L - 1 and s[2, 0] == 20 and s[3, 0] == 5


def test_saturation_only_scan_writes_the_same_table_without_trajectories(tiny_model, tmp_path):
    texts = bt.wiki_texts(5, split="val")
    full = bt.scan(tiny_model, texts, k=3, max_len=24, out=tmp_path / "full", progress=False)
    lenses = {"logit": bt.LogitLens(tiny_model), "again": bt.LogitLens(tiny_model)}
    bt.scan(
        tiny_model, texts, lens=lenses, k=3, max_len=24, keep="saturation",
        out=tmp_path / "only", progress=False,
    )  # fmt: skip
    assert (tmp_path / "full" / "saturation.parquet").read_bytes() == (
        tmp_path / "only" / "saturation.parquet"
    ).read_bytes()
    assert not (tmp_path / "only" / TRAJECTORIES_FILE).exists()
    loaded = bt.load_scan(tmp_path / "only")
    assert not loaded.keeps_trajectories and (loaded.n_layers, loaded.k) == (3, 3)
    np.testing.assert_array_equal(loaded.saturation_array("again"), full.saturation_array())
    assert loaded.ordering().mean_tau == full.ordering().mean_tau
    assert 0 < loaded.info["layer_rows_read_fraction"] <= 1
    # a probe dataset needs only s: the same from either scan
    ours = bt.task_dataset(tiny_model, loaded, layers=range(3), progress=False)
    theirs = bt.task_dataset(tiny_model, full, layers=range(3), progress=False)
    for key in ("X", "y", "groups", "positions"):
        np.testing.assert_array_equal(getattr(ours, key), getattr(theirs, key))
    with pytest.raises(ValueError, match="keep='saturation'"):
        bt.early_exit.ExitSignals.from_scan(loaded)
    with pytest.raises(ValueError, match="a probe needs keep='all'"):
        bt.scan(tiny_model, texts, keep="saturation", probe=object(), progress=False)
    with pytest.raises(ValueError, match="keep must be one of"):
        bt.scan(tiny_model, texts, keep="some")
    again = bt.scan(
        tiny_model, texts, lens=lenses, k=3, max_len=24, keep="saturation",
        out=tmp_path / "only", resume=True, progress=False,
    )  # fmt: skip
    assert again.saturation.equals(loaded.saturation)  # a finished scan is loaded
