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
from beyond_top1 import hooked
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


def brute_force_pairs(frame, max_distance, delta, direction="forward"):
    """(source row, target row): same text and top-1, s gap >= delta, the source before the
    target (forward) or after it (backward), at most max_distance tokens apart."""
    pairs = set()
    rows = frame.to_dict("records")
    for i, j in itertools.permutations(range(len(rows)), 2):
        a, b = rows[i], rows[j]  # a: source, b: target
        ahead = b["pos"] - a["pos"] if direction == "forward" else a["pos"] - b["pos"]
        if (
            a["text_id"] == b["text_id"]
            and a["top_1_id"] == b["top_1_id"]
            and 0 < ahead <= max_distance
            and b["s_1"] - a["s_1"] >= delta
        ):
            pairs.add((i, j))
    return pairs


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_find_pairs_matches_brute_force(direction):
    frame = pair_frame()
    pairs = find_pairs(
        frame, max_distance=10, delta=8, max_pairs=None, one_per_target=False, direction=direction
    )
    expected = brute_force_pairs(frame, 10, 8, direction)
    assert len(expected) > 10
    assert set(zip(pairs["src_row"], pairs["tgt_row"], strict=True)) == expected
    assert (pairs["s_tgt"] - pairs["s_src"] >= 8).all()  # the source saturates first
    assert (pairs["distance"] <= 10).all() and (pairs["distance"] > 0).all()
    before = pairs["src_pos"] < pairs["tgt_pos"]
    assert before.all() if direction == "forward" else (~before).all()
    assert (pairs["direction"] == direction).all()
    only = find_pairs(frame, max_distance=10, delta=8, max_pairs=None, text_ids=[1, 3])
    assert set(only["text_id"]) <= {1, 3} and len(only) > 0
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
    """Both engines against plain run_with_hooks (the cached one where the line has it)."""
    cached = None
    if hooked.supports_tl_kv_cache(model):
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
        if cached is not None:
            torch.testing.assert_close(cached[row], expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(full[row], expected, atol=2e-5, rtol=1e-5)
        # layers before the patch are untouched; the patched layer holds the source's state
        unpatched = reference_patch(model, token_lists[t], target, None, None)
        torch.testing.assert_close(expected[:layer], unpatched[:layer])
        _, clean = model.run_with_cache(torch.tensor([token_lists[t]]))
        torch.testing.assert_close(
            expected[layer], clean[f"blocks.{layer}.hook_resid_post"][0, source]
        )


def test_own_activation_patch_reproduces_the_unpatched_run_exactly(model, token_lists):
    rows = [(0, 9, 2), (1, 4, 0), (2, 17, 4), (1, 12, 5)]
    targets = [target for _, target, _ in rows]
    if hooked.supports_tl_kv_cache(model):  # the cached engine (TransformerLens 3.9)
        states = text_states(model, token_lists)
        picked = [states[t] for t, _, _ in rows]
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
    texts = bt.wiki_texts(12, split="val", seed=0)
    return texts, bt.scan(rms_model, texts, k=3, max_len=32, batch_size=4, progress=False)


def reference_outcome(model, ids, target, layer, source):
    """New s_1 and final top-1 of the target after the patch: a plain run_with_hooks, float64
    logits and the definition of s_1 as loops."""
    resid = reference_patch(model, ids, target, layer, source)  # [L, d]
    normed = model.ln_final(resid.double()[None])[0].double()
    logits = normed @ model.W_U.detach().double() + model.b_U.detach().double()
    top1 = logits.argmax(-1).tolist()
    s1 = next(l for l in range(L_TINY) if all(t == top1[-1] for t in top1[l:]))
    return s1, top1[-1]


def test_intervene_end_to_end(rms_model, small_scan, tmp_path):
    texts, scan = small_scan
    pairs = find_pairs(scan, delta=2, max_pairs=10, seed=0)
    assert len(pairs) >= 5
    result = intervene(
        rms_model, scan, texts, pairs=pairs, offsets=[-1, 0, 1], progress=False, runs_per_batch=8
    )
    trials, out_pairs = result.trials, result.pairs
    # the own-activation run reproduces the scan's unpatched s_1 and top-1
    assert out_pairs["base_matches_scan"].all()
    assert (trials["kind"] == "own").sum() == len(pairs)
    patch = trials[trials["kind"] == "patch"]
    merged = trials.merge(out_pairs[["pair_id", "text_id", "top1_id", "s_src"]], on="pair_id")
    patched = merged[merged["kind"] == "patch"]
    assert (patched["layer"] == patched["s_src"] + patched["d"]).all()
    # outcomes of every kind against a one-trial reference
    runs = merged[merged["kind"] != "own"]
    for row in runs.groupby("kind").head(8).itertuples():
        ids = tokenize(rms_model, texts[row.text_id], max_len=32, truncate=True)
        s1, top1 = reference_outcome(rms_model, ids, row.tgt_pos, row.layer, row.from_pos)
        assert (row.new_s1, row.new_top1) == (s1, top1), row
        assert row.success == (top1 == row.top1_id and s1 <= row.layer)
        assert row.strict == (top1 == row.top1_id and s1 == row.layer)
    assert (trials["kind"] == "random").sum() == len(patch)
    table = result.by_offset()
    assert table["d"].tolist() == [-1, 0, 1]
    assert table["n"].sum() == len(patch)
    assert table["success"].sum() == patch["success"].sum()
    matched = trials[trials["kind"] == "matched"]
    assert table["matched_n"].sum() == len(matched)
    assert table["matched_success"].sum() == matched["success"].sum()
    sign = result.by_sign().set_index("offsets")
    assert sign.loc["d < 0", "n"] == (patch["d"] < 0).sum()
    assert sign.loc["d >= 0", "n"] == (patch["d"] >= 0).sum()
    # the paired effect against each control, by hand
    for control in ("matched", "random"):
        both = patch.merge(trials[trials["kind"] == control], on=["pair_id", "d"])
        if len(both) > 1:
            diff = both["success_x"].astype(float) - both["success_y"].astype(float)
            assert table[f"effect_vs_{control}"].notna().any()
            per_d = both.assign(diff=diff).groupby("d")["diff"].mean()
            got = table.set_index("d")[f"effect_vs_{control}"].dropna()
            np.testing.assert_allclose(got.to_numpy(), per_d.loc[got.index].to_numpy())
    result.save(tmp_path)
    for name in ("pairs.csv", "trials.csv", "by_offset.csv", "by_sign.csv", "summary.json"):
        assert (tmp_path / name).is_file()
    # the full engine gives the same outcomes
    full = intervene(
        rms_model, scan, texts, pairs=pairs, offsets=[-1, 0, 1], progress=False, engine="full"
    )
    for column in ("new_s1", "new_top1", "success", "strict"):
        assert full.trials[column].tolist() == trials[column].tolist()


def test_control_donors_follow_the_protocol(rms_model, small_scan):
    texts, scan = small_scan
    pairs = find_pairs(scan, delta=2, max_pairs=8, seed=1)
    result = intervene(rms_model, scan, texts, pairs=pairs, offsets=[-1, 0, 1], progress=False)
    frame = scan.saturation.reset_index().set_index(["text_id", "pos"])
    trials = result.trials.merge(
        result.pairs[["pair_id", "text_id", "src_pos", "src_row"]], on="pair_id"
    )
    random = trials[trials["kind"] == "random"]
    assert len(random) == (trials["kind"] == "patch").sum()
    assert (random["from_pos"] != random["tgt_pos"]).all()
    assert (random["from_pos"] != random["src_pos"]).all()
    matched = trials[trials["kind"] == "matched"]
    assert len(matched) > 0
    for row in matched.itertuples():
        donor = frame.loc[(row.text_id, row.from_pos), "index"]
        # the donor's lens top-1 at l is the source's, and it has not saturated by l
        assert scan.top_ids[donor, row.layer, 0] == scan.top_ids[row.src_row, row.layer, 0]
        assert scan.saturation["s_1"].iat[donor] > row.layer
        assert row.from_pos < row.tgt_pos and row.from_pos != row.src_pos


def test_a_probe_fitted_on_the_targets_is_refused(rms_model, small_scan):
    from beyond_top1.probes import TaskProbe, task_dataset

    texts, scan = small_scan
    data = task_dataset(rms_model, scan, n_tasks=2, balance=False, progress=False)
    probe = TaskProbe().fit(data)
    pairs = find_pairs(scan, delta=2, max_pairs=4, seed=1)
    with pytest.raises(ValueError, match="in-sample"):
        intervene(rms_model, scan, texts, pairs=pairs, offsets=[0], probe=probe, progress=False)
    # fitted on the other texts only, it is accepted
    others = np.flatnonzero(~np.isin(data.groups, pairs["text_id"].unique()))
    held_out = TaskProbe().fit(data.subset(others))
    result = intervene(
        rms_model, scan, texts, pairs=pairs, offsets=[0], probe=held_out, progress=False
    )
    assert "probe_next_after" in result.trials.columns
