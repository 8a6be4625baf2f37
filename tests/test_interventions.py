"""Task-shift interventions: pair finding, the two patching engines against a one-row reference,
the own-activation control (an exact no-op), and the rates."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_model

import beyond_top1 as bt
from beyond_top1.data import tokenize
from beyond_top1.interventions import (
    default_delta,
    default_offset_range,
    find_pairs,
    intervene,
    patch_and_read,
    patch_and_read_cached,
    text_states,
)

L_TINY = 6


def test_default_delta_scales_with_depth():
    assert [default_delta(L) for L in (48, 30, 24, 12, 6, 3, 2, 1)] == [10, 10, 10, 5, 3, 1, 1, 1]
    assert default_offset_range(30) == 5 and default_offset_range(12) == 2
    assert default_offset_range(2) == 1


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def pair_frame(seed=0, n_texts=4, per_text=25) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "text_id": np.repeat(np.arange(n_texts), per_text),
            "pos": np.tile(np.arange(1, per_text + 1), n_texts) * 2,  # 2, 4, ... 50
            "top_1_id": rng.integers(0, 4, size=n_texts * per_text),
            "s_1": rng.integers(0, 30, size=n_texts * per_text),
        }
    )


def brute_force_pairs(frame, max_distance, delta):
    pairs = set()
    rows = frame.to_dict("records")
    for i, j in itertools.permutations(range(len(rows)), 2):
        a, b = rows[i], rows[j]
        if (
            a["text_id"] == b["text_id"]
            and a["top_1_id"] == b["top_1_id"]
            and 0 < abs(a["pos"] - b["pos"]) <= max_distance
            and b["s_1"] - a["s_1"] >= delta
        ):
            pairs.add((i, j))
    return pairs


def test_find_pairs_matches_brute_force():
    frame = pair_frame()
    pairs = find_pairs(frame, max_distance=10, delta=8, max_pairs=None, one_per_target=False)
    expected = brute_force_pairs(frame, 10, 8)
    assert len(expected) > 20
    assert set(zip(pairs["src_row"], pairs["tgt_row"], strict=True)) == expected
    assert (pairs["s_tgt"] - pairs["s_src"] >= 8).all()  # the source saturates first
    assert (pairs["distance"] <= 10).all() and (pairs["distance"] > 0).all()
    src = frame.iloc[pairs["src_row"]]
    assert (src["pos"].to_numpy() == pairs["src_pos"].to_numpy()).all()
    assert (src["top_1_id"].to_numpy() == pairs["top1_id"].to_numpy()).all()


def test_find_pairs_sampling_is_seeded_and_one_per_target():
    frame = pair_frame(seed=1)
    everything = find_pairs(frame, max_distance=30, delta=5, max_pairs=None, one_per_target=False)
    a = find_pairs(frame, max_distance=30, delta=5, max_pairs=12, seed=3)
    b = find_pairs(frame, max_distance=30, delta=5, max_pairs=12, seed=3)
    c = find_pairs(frame, max_distance=30, delta=5, max_pairs=12, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert len(a) == 12 and a["tgt_row"].is_unique
    known = set(zip(everything["src_row"], everything["tgt_row"], strict=True))
    assert set(zip(a["src_row"], a["tgt_row"], strict=True)) <= known
    assert a["pair_id"].tolist() == list(range(12))
    with pytest.raises(ValueError, match="n_layers"):
        find_pairs(frame)
    assert find_pairs(frame, n_layers=12, max_pairs=None).attrs["delta"] == 5


# ---------------------------------------------------------------------------------------------
# Patching engines
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["RMS", "LN"])
def model(request):
    return make_tiny_model(n_layers=L_TINY, d_model=32, normalization=request.param, seed=4)


@pytest.fixture(scope="module")
def token_lists(model):
    texts = bt.wiki_texts(3, split="val", seed=2)
    return [tokenize(model, t, max_len=20, truncate=True) for t in texts]


def reference_patch(model, ids, target, layer, source):
    """One text, no batching, no cache: replace the target with the source's unpatched state."""
    from hooks import record, replace_at_positions

    tokens = torch.tensor([ids])
    _, cache = model.run_with_cache(tokens)
    store = {}
    hooks = [(f"blocks.{l}.hook_resid_post", record(store)) for l in range(L_TINY)]
    if layer is not None:
        vec = cache[f"blocks.{layer}.hook_resid_post"][0, source]
        hooks.insert(
            layer, (f"blocks.{layer}.hook_resid_post", replace_at_positions({target: vec}))
        )
    model.run_with_hooks(tokens, fwd_hooks=hooks)
    return torch.stack([store[f"blocks.{l}.hook_resid_post"][0, target] for l in range(L_TINY)])


ROWS = [  # (text, target, layer, source); left padding differs per row in the cached engine
    (0, 9, 2, 3),
    (1, 4, 0, 15),
    (2, 17, 4, 11),
    (0, 0, 1, 5),
    (1, 12, 3, 12),
]


def test_both_engines_match_a_one_row_reference(model, token_lists):
    states = text_states(model, token_lists)
    cached = patch_and_read_cached(
        model,
        [states[t] for t, *_ in ROWS],
        [target for _, target, _, _ in ROWS],
        [(layer, source) for _, _, layer, source in ROWS],
    )
    width = max(max(target, source) for _, target, _, source in ROWS) + 1
    tokens = torch.zeros((len(ROWS), width), dtype=torch.long)
    for row, (t, *_) in enumerate(ROWS):
        ids = token_lists[t][:width]
        tokens[row, : len(ids)] = torch.tensor(ids)
    full = patch_and_read(
        model,
        tokens,
        [target for _, target, _, _ in ROWS],
        [(layer, target, source) for _, target, layer, source in ROWS],
    )
    for row, (t, target, layer, source) in enumerate(ROWS):
        expected = reference_patch(model, token_lists[t], target, layer, source)
        torch.testing.assert_close(cached[row], expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(full[row], expected, atol=2e-5, rtol=1e-5)
        # layers before the patch are untouched; the patched layer holds the source's state
        unpatched = reference_patch(model, token_lists[t], target, None, None)
        torch.testing.assert_close(expected[:layer], unpatched[:layer])
        torch.testing.assert_close(expected[layer], states[t].resid[source, layer])


def test_own_activation_patch_reproduces_the_unpatched_run_exactly(model, token_lists):
    states = text_states(model, token_lists)
    rows = [(0, 9, 2), (1, 4, 0), (2, 17, 4), (1, 12, 5)]
    picked = [states[t] for t, _, _ in rows]
    targets = [target for _, target, _ in rows]
    own = patch_and_read_cached(model, picked, targets, [(l, tg) for _, tg, l in rows])
    none = patch_and_read_cached(model, picked, targets, [None] * len(rows))
    assert torch.equal(own, none)
    # the full engine: own patch == no patch == a plain cached run of the same tokens
    tokens = torch.zeros((len(rows), 18), dtype=torch.long)
    for row, (t, *_) in enumerate(rows):
        ids = token_lists[t][:18]
        tokens[row, : len(ids)] = torch.tensor(ids)
    own_full = patch_and_read(model, tokens, targets, [(l, tg, tg) for _, tg, l in rows])
    none_full = patch_and_read(model, tokens, targets)
    assert torch.equal(own_full, none_full)
    _, cache = model.run_with_cache(tokens)
    plain = torch.stack(
        [cache[f"blocks.{l}.hook_resid_post"][range(len(rows)), targets] for l in range(L_TINY)],
        dim=1,
    )
    assert torch.equal(own_full, plain)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


# ---------------------------------------------------------------------------------------------
# The experiment end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rms_model():
    return make_tiny_model(n_layers=L_TINY, d_model=32, seed=0)


@pytest.fixture(scope="module")
def small_scan(rms_model):
    texts = bt.wiki_texts(6, split="val", seed=0)
    return texts, bt.scan(rms_model, texts, k=3, max_len=32, batch_size=3, progress=False)


def test_intervene_end_to_end(rms_model, small_scan, tmp_path):
    texts, scan = small_scan
    pairs = find_pairs(scan, delta=2, max_pairs=10, seed=0)
    assert len(pairs) >= 5
    result = intervene(
        rms_model, scan, texts, pairs=pairs, offsets=[-1, 0, 1], progress=False, batch_size=8
    )
    trials, out_pairs = result.trials, result.pairs
    # the own-activation control reproduces the scan's unpatched s_1 and top-1
    assert out_pairs["base_matches_scan"].all()
    assert (trials["kind"] == "own").sum() == len(pairs)
    patch = trials[trials["kind"] == "patch"]
    merged = patch.merge(out_pairs, on="pair_id")
    assert (merged["layer"] == merged["s_src"] + merged["d"]).all()
    expected = (merged["new_top1"] == merged["top1_id"]) & (merged["new_s1"] <= merged["layer"])
    assert (merged["success"] == expected).all()
    assert (merged["strict"] <= merged["success"]).all()
    assert (trials["kind"] == "random").sum() == len(patch)
    table = result.by_offset()
    assert table["d"].tolist() == [-1, 0, 1]
    assert table["n"].sum() == len(patch)
    assert table["success"].sum() == patch["success"].sum()
    sign = result.by_sign().set_index("offsets")
    assert sign.loc["d < 0", "n"] == (patch["d"] < 0).sum()
    assert sign.loc["d >= 0", "n"] == (patch["d"] >= 0).sum()
    # own control per d: the unpatched target already final at l (never, since l < s_tgt here)
    gap_ok = (merged["s_tgt"] > merged["layer"]).all()
    if gap_ok:
        assert (table["own_success_rate"] == 0).all()
    result.save(tmp_path)
    for name in ("pairs.csv", "trials.csv", "by_offset.csv", "by_sign.csv", "summary.json"):
        assert (tmp_path / name).is_file()
    # the full engine gives the same outcomes
    full = intervene(
        rms_model, scan, texts, pairs=pairs, offsets=[-1, 0, 1], progress=False, engine="full"
    )
    for column in ("new_s1", "new_top1", "success", "strict"):
        assert full.trials[column].tolist() == trials[column].tolist()


def test_random_donors_have_another_top1(rms_model, small_scan):
    texts, scan = small_scan
    pairs = find_pairs(scan, delta=2, max_pairs=6, seed=1)
    result = intervene(rms_model, scan, texts, pairs=pairs, offsets=[0], progress=False)
    frame = scan.saturation.set_index(["text_id", "pos"])
    random = result.trials[result.trials["kind"] == "random"].merge(
        result.pairs[["pair_id", "text_id", "src_pos", "top1_id"]], on="pair_id"
    )
    assert len(random) == len(pairs)
    donor_top1 = frame.loc[
        list(zip(random["text_id"], random["from_pos"], strict=True)), "top_1_id"
    ]
    assert (donor_top1.to_numpy() != random["top1_id"].to_numpy()).all()
    assert (random["from_pos"] != random["tgt_pos"]).all()
    assert (random["from_pos"] != random["src_pos"]).all()
