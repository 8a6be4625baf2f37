"""Chosen-token trajectories, batches of prompts and hooked runs, against slow references:
float64 logits with a full sort, the model's own log-probs, plain ``run_with_hooks`` and
TransformerLens 4.3's ``logit_lens(..., targets=...)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import beyond_top1 as bt
from beyond_top1 import hooked
from beyond_top1.bridge import transformer_lens_major
from beyond_top1.cell_stats import cell_stats, exact_ranks
from beyond_top1.prompt import prompt_residuals, prompts_residuals, resolve_targets
from beyond_top1.ranking import _Unembedding, exact_logits, normed_residual
from hooks import replace_at_positions

PROMPT = "The capital of France is Paris, and the capital of Italy is"
TL4 = transformer_lens_major() >= 4


@torch.no_grad()
def _float64_reference(lens, resid, layers, target_ids):
    """Per (pos, layer, target): rank by a full stable sort of float64 logits (ties to the lower
    id), log-prob and logit, and per cell the entropy and KL to the last layer, all in float64."""
    model = lens.model
    weight, bias = (t.double() for t in hooked.unembedding(model))
    n_pos, n = target_ids.shape
    ranks = np.zeros((n_pos, len(layers), n), dtype=np.int64)
    logprobs = np.zeros((n_pos, len(layers), n))
    entropy = np.zeros((n_pos, len(layers)))
    all_logp = []
    for j, layer in enumerate(layers):
        x = normed_residual(lens, resid[:, j], layer).double()
        logits = x @ weight + bias  # [pos, vocab]
        logp = logits.log_softmax(-1)
        all_logp.append(logp)
        entropy[:, j] = -(logp.exp() * logp).sum(-1).numpy()
        order = np.lexsort((np.arange(logits.shape[1])[None].repeat(n_pos, 0), -logits.numpy()))
        place = np.empty_like(order)
        np.put_along_axis(place, order, np.arange(1, logits.shape[1] + 1)[None], axis=1)
        ranks[:, j] = np.take_along_axis(place, target_ids, axis=1)
        logprobs[:, j] = np.take_along_axis(logp.numpy(), target_ids, axis=1)
    final = all_logp[-1]
    kl = np.stack([(final.exp() * (final - lp)).sum(-1).numpy() for lp in all_logp], 1)
    return ranks, logprobs, entropy, kl


@pytest.mark.parametrize("fixture", ["tiny_model", "smollm2"])
def test_target_ranks_logprobs_entropy_kl_match_a_float64_full_sort(fixture, request):
    model = request.getfixturevalue(fixture)
    lens = bt.LogitLens(model)
    ids, resid = prompt_residuals(model, PROMPT)
    layers = tuple(range(hooked.n_layers(model)))
    targets = np.stack([np.asarray(ids[1:] + ids[:1]), np.full(len(ids), 1000)], 1)
    stats = cell_stats(lens, resid, layers, torch.as_tensor(targets))
    ranks, logprobs, entropy, kl = _float64_reference(lens, resid, layers, targets)
    np.testing.assert_array_equal(stats.target_ranks.numpy(), ranks)
    # log Z, entropy and KL come from fp32 GEMM logits: their round-off, not the exact rule
    np.testing.assert_allclose(stats.target_logprobs.numpy(), logprobs, atol=1e-4)
    np.testing.assert_allclose(stats.entropy.numpy(), entropy, atol=1e-4)
    np.testing.assert_allclose(stats.kl_to_final.numpy(), kl, atol=1e-4)
    assert stats.target_ranks.max() > 100  # deep ranks are covered, not only the top k


def test_ties_and_near_ties_rank_exactly():
    """Identical columns tie exactly (the lower id ranks first); columns that differ by one ulp
    are ordered by their exact logits even though fp32 GEMMs cannot tell them apart."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 3000, generator=gen)
    weight[:, 900] = weight[:, 20]  # exact tie with token 20
    weight[:, 901] = torch.nextafter(weight[:, 20], torch.full_like(weight[:, 20], 1e9))
    bias = torch.zeros(3000)
    emb = _Unembedding.of_tensors(weight, bias, "fp32")
    normed = torch.randn(8, 64, generator=gen).abs()  # positive: 901's logit is the larger
    ids = torch.tensor([[20, 900, 901]] * 8)
    logits = normed @ weight
    exact = exact_logits(normed, weight, bias, ids)
    ranks = exact_ranks(normed, logits, emb, ids, exact).numpy()
    full = normed.double() @ weight.double()
    order = np.lexsort((np.arange(3000)[None].repeat(8, 0), -full.numpy()))
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.arange(1, 3001)[None], axis=1)
    np.testing.assert_array_equal(ranks, np.take_along_axis(place, ids.numpy(), axis=1))
    np.testing.assert_array_equal(ranks[:, 1], ranks[:, 0] + 1)  # the tie: lower id first
    np.testing.assert_array_equal(ranks[:, 2], ranks[:, 0] - 1)  # one ulp above both


def test_last_layer_target_logprobs_are_the_models_own(smollm2):
    traj = bt.trajectory(smollm2, PROMPT, targets=[" Rome", " Paris", 42])
    tokens = torch.tensor([bt.tokenize(smollm2, PROMPT)])
    with torch.no_grad():
        own = smollm2(tokens)[0].double().log_softmax(-1)  # [pos, vocab]
    ids = traj.target_ids  # [pos, 3]
    np.testing.assert_allclose(
        traj.target_logprobs[:, -1], own.gather(-1, torch.as_tensor(ids)).numpy(), atol=5e-5
    )
    # The model's own fp32 logits may order near-ties differently from the exact rule: ranks
    # agree up to the tokens within 1e-4 of the target's logit.
    target = own.gather(-1, torch.as_tensor(ids))[..., None]
    own_rank = (own[:, None, :] > target).sum(-1) + 1
    near = ((own[:, None, :] - target).abs() < 1e-4).sum(-1) - 1
    assert (np.abs(traj.target_ranks[:, -1] - own_rank.numpy()) <= near.numpy()).all()
    frame = traj.targets
    assert list(frame.columns) == [
        "pos", "token", "layer", "target", "target_id", "target_token", "rank", "logprob",
        "prob", "logit",
    ]  # fmt: skip
    assert len(frame) == traj.n_positions * traj.n_layers * 3
    last = frame[(frame.pos == traj.n_positions - 1) & (frame.layer == traj.n_layers - 1)]
    assert last.set_index("target")["rank"].to_dict()[" Rome"] == 1
    assert last.set_index("target")["target_token"].to_dict()[" Paris"] == " Paris"


def test_next_token_targets_and_per_position_ids_agree(tiny_model):
    traj = bt.trajectory(tiny_model, PROMPT, targets="next")
    ids = traj.token_ids
    per_position = np.append(ids[1:], -1)
    again = bt.trajectory(tiny_model, PROMPT, targets=per_position)
    np.testing.assert_array_equal(traj.target_ranks, again.target_ranks)
    assert traj.target_ranks[-1].max() == -1 and np.isnan(traj.target_logprobs[-1]).all()
    np.testing.assert_array_equal(traj.target_ranks[:-1, -1, 0], traj.next_rank[:-1])
    assert len(traj.targets) == (traj.n_positions - 1) * traj.n_layers


def test_target_errors_say_what_to_do(tiny_model):
    with pytest.raises(ValueError, match="not one.*leading space"):
        bt.trajectory(tiny_model, PROMPT, targets=" Rome and Paris")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bt.trajectory(tiny_model, PROMPT, targets=10**7)
    with pytest.raises(ValueError, match="one row per prompt token"):
        bt.trajectory(tiny_model, PROMPT, targets=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="need one prompt"):
        bt.trajectory(tiny_model, [PROMPT, "Hello"], targets=np.array([1, 2]))
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        bt.trajectory(tiny_model, [PROMPT, 3])
    with pytest.raises(ValueError, match="prompt 1: The text is empty"):
        bt.top_tokens(tiny_model, [PROMPT, "  "])
    with pytest.raises(TypeError, match="fwd_hooks must be"):
        bt.trajectory(tiny_model, PROMPT, fwd_hooks=["blocks.0.hook_resid_post"])
    rome = bt.prompt.single_token_id(tiny_model, " Rome")
    with pytest.raises(ValueError, match="given twice"):
        resolve_targets(tiny_model, [" Rome", rome], [1, 2])


def test_next_may_join_other_targets_and_look_alike_tokens_keep_apart(tiny_model):
    ids = bt.tokenize(tiny_model, PROMPT)
    per_position, labels = resolve_targets(tiny_model, [" Rome", "next"], ids)
    assert labels == [" Rome", "next token"]
    np.testing.assert_array_equal(per_position[:-1, 1], ids[1:])
    assert per_position[-1, 1] == -1 and (per_position[:, 0] == per_position[0, 0]).all()
    # ids 218 and 219 are byte tokens that both decode to the replacement character
    _, labels = resolve_targets(tiny_model, [218, 219], ids)
    assert len(set(labels)) == 2 and labels[1].endswith("#219")
    traj = bt.trajectory(tiny_model, PROMPT, targets=[218, 219])
    assert not np.array_equal(traj.stat(f"rank: {labels[0]}"), traj.stat(f"rank: {labels[1]}"))


def test_hooks_on_a_batch_see_no_padding(tiny_model):
    """A hook on the last position changes each prompt as it does when the prompt runs alone."""
    from hooks import zero_ablate

    prompts = [PROMPT, "Hi there", "A third, middling prompt"]
    hook = ("blocks.0.hook_resid_post", zero_ablate(positions=[-1]))
    batch = bt.trajectory(tiny_model, prompts, targets="next", fwd_hooks=[hook])
    for prompt, patched in zip(prompts, batch, strict=True):
        alone = bt.trajectory(tiny_model, prompt, targets="next", fwd_hooks=[hook])
        clean = bt.trajectory(tiny_model, prompt, targets="next")
        np.testing.assert_allclose(patched.top_logprobs, alone.top_logprobs, atol=1e-5)
        assert np.abs(patched.top_logprobs[-1] - clean.top_logprobs[-1]).max() > 1e-3


def test_right_padding_leaves_every_prompt_as_if_run_alone(smollm2):
    prompts = [PROMPT, "Short one", "A middle length prompt about cities"]
    batched = prompts_residuals(smollm2, prompts)
    for prompt, (ids, resid) in zip(prompts, batched, strict=True):
        solo_ids, solo = prompt_residuals(smollm2, prompt)
        assert ids == solo_ids
        scale = solo.abs().amax(-1, keepdim=True)
        assert ((resid - solo).abs() / scale).max() < 1e-4  # float32 round-off of another GEMM


def test_batches_stack_tables_with_a_prompt_column(tiny_model):
    prompts = [PROMPT, "Hello there"]
    batch = bt.trajectory(tiny_model, prompts, targets=" Rome")
    assert len(batch) == 2 and batch.prompts == prompts
    solo = [bt.trajectory(tiny_model, p, targets=" Rome") for p in prompts]
    for one, alone in zip(batch, solo, strict=True):
        np.testing.assert_array_equal(one.token_ids, alone.token_ids)
        np.testing.assert_allclose(one.target_logprobs, alone.target_logprobs, atol=1e-4)
    targets = batch.targets
    assert targets.columns[0] == "prompt"
    assert targets.groupby("prompt").size().tolist() == [len(t) * t.n_layers for t in solo]
    table = bt.top_tokens(tiny_model, prompts, k=3)
    assert table.columns[0] == "prompt"
    assert table.groupby("prompt").size().tolist() == [3 * tiny_model.cfg.n_layers] * 2
    alone = bt.top_tokens(tiny_model, prompts[1], k=3)
    second = table[table.prompt == 1].reset_index(drop=True)
    assert second["token_id"].tolist() == alone["token_id"].tolist()
    np.testing.assert_allclose(second["prob"], alone["prob"], atol=1e-5)


def test_hooked_trajectory_is_the_run_with_hooks_logprob_and_hooks_come_off(smollm2):
    ids, resid = prompt_residuals(smollm2, PROMPT)
    donor = resid[3, 10]
    hook = ("blocks.10.hook_resid_post", replace_at_positions({len(ids) - 1: donor}))
    patched = bt.trajectory(smollm2, PROMPT, targets=[" Rome", " Paris"], fwd_hooks=[hook])
    tokens = torch.tensor([ids])
    with torch.no_grad():
        reference = smollm2.run_with_hooks(tokens, fwd_hooks=[hook])[0, -1].double()
        clean = smollm2(tokens)[0, -1].double()
    wanted = reference.log_softmax(-1)[patched.target_ids[-1]].numpy()
    np.testing.assert_allclose(patched.target_logprobs[-1, -1], wanted, atol=5e-5)
    assert np.abs(wanted - clean.log_softmax(-1)[patched.target_ids[-1]].numpy()).max() > 0.1
    after = bt.trajectory(smollm2, PROMPT, targets=[" Rome", " Paris"])
    np.testing.assert_allclose(
        after.target_logprobs[-1, -1], clean.log_softmax(-1)[after.target_ids[-1]], atol=5e-5
    )  # the hook came off
    assert patched.settings["hooked"] and not after.settings["hooked"]


@pytest.mark.skipif(not TL4, reason="TransformerLens 4's logit_lens")
def test_target_ranks_equal_transformer_lens_4_logit_lens(smollm2):
    """Equal wherever TL's fp32 comparison can tell the tokens apart; where it differs, ours is
    the float64 full sort's rank and a token lies within 1e-4 of the target's logit."""
    from transformer_lens.tools.analysis import logit_lens

    names = [" Rome", " Paris", " the"]
    traj = bt.trajectory(smollm2, PROMPT, targets=names)
    tokens = torch.tensor([traj.token_ids.tolist()])
    result = logit_lens(smollm2, tokens, positions=None, targets=names)
    L = traj.n_layers
    stack_of = {label: i for i, label in enumerate(result.labels)}
    lens = bt.LogitLens(smollm2)
    _, resid = prompt_residuals(smollm2, PROMPT)
    weight, bias = (t.double() for t in hooked.unembedding(smollm2))
    cells = differ = 0
    for c, name in enumerate(names):
        theirs = result.rank_trajectory(name)  # [stack entries, batch, pos], 0-based
        for layer in range(L):
            label = "final_post" if layer == L - 1 else f"{layer + 1}_pre"
            tl_ranks = theirs[stack_of[label], 0].numpy() + 1
            ours = traj.target_ranks[:, layer, c]
            cells += len(ours)
            for pos in np.flatnonzero(ours != tl_ranks):
                differ += 1
                with torch.no_grad():
                    x = normed_residual(lens, resid[pos : pos + 1, layer], layer).double()
                    logits = (x @ weight + bias)[0]
                t = int(traj.target_ids[pos, c])
                above = int((logits > logits[t]).sum() + (logits[:t] == logits[t]).sum())
                assert ours[pos] == above + 1
                near = int(((logits - logits[t]).abs() < 1e-4).sum()) - 1
                assert abs(int(ours[pos]) - int(tl_ranks[pos])) <= near, (name, layer, pos)
    assert cells == traj.n_positions * L * len(names)
    assert differ <= cells // 200  # 1 of 1,170 cells on this machine
