"""bt.trajectory against full-sort and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import beyond_top1 as bt
from beyond_top1.prompt import top_tokens as readout_top_tokens

PROMPT = "The capital of France is Paris. The capital of Germany is"


def _layer_logprobs(model, prompt: str):
    """``[pos, L, vocab]`` log-probs of the logit lens and the model's own, by plain TL calls."""
    ids = bt.tokenize(model, prompt)
    with torch.no_grad():
        out, cache = model.run_with_cache(torch.tensor([ids]))
        logprobs = torch.stack(
            [
                (
                    model.ln_final(cache[f"blocks.{layer}.hook_resid_post"][0]) @ model.W_U
                    + model.b_U
                ).log_softmax(-1)
                for layer in range(model.cfg.n_layers)
            ],
            1,
        )
    return ids, logprobs.float(), out[0].float().log_softmax(-1)


def _reference(model, prompt: str, k: int):
    """Full-sort reference: per position and layer, the top-k ids/log-probs, the ranks of the
    final top-k and the final rank/log-prob of the next token."""
    ids, logprobs, model_lp = _layer_logprobs(model, prompt)
    L = logprobs.shape[1]
    order = logprobs.argsort(-1, descending=True)  # a full sort: the slow, obvious reference
    top_ids = order[..., :k]
    place = order.argsort(-1) + 1  # 1-based rank of every vocabulary entry
    final = top_ids[:, -1]  # [pos, k]
    next_ids = torch.tensor(ids[1:])
    return {
        "ids": ids,
        "top_ids": top_ids.numpy(),
        "top_lp": logprobs.gather(-1, top_ids).numpy(),
        "final_ranks": place.gather(-1, final[:, None, :].expand(-1, L, -1)).numpy(),
        "next_rank": place[:-1, -1].gather(-1, next_ids[:, None])[:, 0].numpy(),
        "next_lp": logprobs[:-1, -1].gather(-1, next_ids[:, None])[:, 0].numpy(),
        "model_lp": model_lp,
    }


def _brute_force_s(top_ids: np.ndarray) -> np.ndarray:
    """s_i by walking back from the last layer while rank i still holds its final token."""
    n_pos, L, k = top_ids.shape
    s = np.zeros((n_pos, k), dtype=np.int64)
    for p in range(n_pos):
        for i in range(k):
            layer = L - 1
            while layer > 0 and top_ids[p, layer - 1, i] == top_ids[p, L - 1, i]:
                layer -= 1
            s[p, i] = layer
    return s


@pytest.fixture(scope="module")
def tiny_traj(tiny_model):
    return bt.trajectory(tiny_model, PROMPT, k=5)


def test_topk_matches_full_sort(tiny_model, tiny_traj):
    ref = _reference(tiny_model, PROMPT, 5)
    traj = tiny_traj
    assert traj.token_ids.tolist() == ref["ids"]
    assert traj.top_ids.shape == (len(ref["ids"]), tiny_model.cfg.n_layers, 5)
    for p in (0, 4, len(ref["ids"]) // 2, -1):
        np.testing.assert_array_equal(traj.top_ids[p], ref["top_ids"][p])
        np.testing.assert_allclose(traj.top_logprobs[p], ref["top_lp"][p], atol=1e-4)
    np.testing.assert_array_equal(traj.final_ranks, ref["final_ranks"])
    # The last layer reproduces the model's own output.
    np.testing.assert_allclose(
        traj.top_logprobs[:, -1],
        ref["model_lp"].gather(-1, torch.as_tensor(traj.top_ids[:, -1])).numpy(),
        atol=1e-4,
    )


def test_next_token_rank_and_logprob(tiny_model, tiny_traj):
    ref = _reference(tiny_model, PROMPT, 5)
    np.testing.assert_array_equal(tiny_traj.next_rank[:-1], ref["next_rank"])
    np.testing.assert_allclose(tiny_traj.next_logprob[:-1], ref["next_lp"], atol=1e-4)
    assert tiny_traj.next_rank[-1] == -1 and np.isnan(tiny_traj.next_logprob[-1])


def test_saturation_matches_brute_force_on_tiny(tiny_traj):
    np.testing.assert_array_equal(tiny_traj.s, _brute_force_s(tiny_traj.top_ids))


def test_saturation_matches_brute_force_on_trained_model(smollm2):
    """A trained model gives varied s, so the comparison can fail in interesting ways."""
    traj = bt.trajectory(smollm2, PROMPT, k=5)
    _, logprobs, _ = _layer_logprobs(smollm2, PROMPT)
    ref_ids = logprobs.topk(5, dim=-1).indices.numpy()
    np.testing.assert_array_equal(traj.top_ids, ref_ids)
    s_ref = _brute_force_s(ref_ids)
    np.testing.assert_array_equal(traj.s, s_ref)
    assert len(np.unique(s_ref)) >= 3  # not all "settles at the last layer"
    frame = traj.saturation
    np.testing.assert_array_equal(frame[[f"s_{i}" for i in range(1, 6)]].to_numpy(), s_ref)
    assert frame.loc[len(frame) - 1, "top_1"] == " Berlin"


def test_top_tokens_frame_matches_readout(tiny_model, tiny_traj):
    for position in (-1, 3):
        ours = tiny_traj.top_tokens(position)
        theirs = readout_top_tokens(tiny_model, PROMPT, k=5, position=position)
        assert list(ours.columns) == ["layer", "rank", "token_id", "token", "prob"]
        np.testing.assert_array_equal(
            ours[["layer", "rank", "token_id"]], theirs[["layer", "rank", "token_id"]]
        )
        assert ours["token"].tolist() == theirs["token"].tolist()
        np.testing.assert_allclose(ours["prob"], theirs["prob"], rtol=1e-4, atol=1e-7)


def test_ranks_and_saturation_frames(tiny_traj):
    traj = tiny_traj
    ranks = traj.ranks(-1)
    L, k = traj.n_layers, traj.k
    assert len(ranks) == L * k
    last = ranks[ranks["layer"] == L - 1]
    assert last["rank"].tolist() == list(range(1, k + 1))  # final tokens hold their ranks at L-1
    frame = traj.saturation
    assert list(frame.columns[:2]) == ["pos", "token"]
    assert frame["token"].tolist() == traj.tokens
    assert frame.attrs["n_layers"] == L
    assert frame["top_1"].tolist() == traj.token_strings(traj.top_ids[:, -1, 0])


def test_errors(tiny_model, tiny_ln_model, tiny_traj):
    with pytest.raises(ValueError, match="another model"):
        bt.trajectory(tiny_model, PROMPT, lens=bt.LogitLens(tiny_ln_model))
    with pytest.raises(IndexError):
        tiny_traj.top_tokens(position=len(tiny_traj))
    with pytest.raises(ValueError, match="precision"):
        bt.trajectory(tiny_model, PROMPT, precision="fp16")


def test_repr_html_is_the_offline_view(tiny_traj):
    page = tiny_traj._repr_html_()
    assert "ColoredTokensMulti" in page and "TopkTokens" in page
    assert "var CircuitsVis" in page and "unpkg.com" not in page
    assert "Trajectory(" in repr(tiny_traj)
