"""The exact read-out rule (docs/conventions.md, "Exact read-outs"): top-k ids, their order,
in-top-k ranks and saturation layers are those of the exact logits (float64 of the fp32 normed
residual and weights, ties to the lower id), whatever the precision, batch, chunking or threads.

The reference is slow and obviously correct: every logit summed with ``math.fsum`` (correctly
rounded) from the exact float64 products, and the vocabulary sorted by ``(-logit, id)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

import beyond_top1 as bt
from beyond_top1 import ranking
from beyond_top1.prompt import prompt_residuals


@pytest.fixture
def emulate_bf16(monkeypatch):
    """Run the bf16 path on any CPU (as fp32 GEMMs of bf16 values: the same arithmetic)."""
    monkeypatch.setenv(ranking.BF16_ENV, "emulate")


@pytest.fixture(scope="module")
def small_vocab_model():
    return make_tiny_model(n_layers=4, d_model=32, d_vocab=97, seed=3)


def reference_normed(model, resid):
    """RMSNorm of the tiny models, in float64, rounded once to fp32, times the weight."""
    h = resid.double()
    scale = (h.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    return (h / scale).float() * model.ln_final.w.detach()


def reference_logits(model, resid):
    """``[rows, vocab]`` correctly rounded float64 logits (``math.fsum`` of exact products)."""
    x = reference_normed(model, resid).double().numpy()
    weight = model.W_U.detach().double().numpy()
    bias = model.b_U.detach().double().numpy()
    rows = [
        [math.fsum([*(x[t] * weight[:, j]).tolist(), bias[j]]) for j in range(weight.shape[1])]
        for t in range(x.shape[0])
    ]
    return torch.tensor(rows, dtype=torch.float64)


def reference_readout(model, resid, k):
    """Top-k ids by ``(-E, id)``, exact ranks of the final top-k, exact log-probs."""
    L = resid.shape[1]
    logits = [reference_logits(model, resid[:, l]) for l in range(L)]
    vocab = logits[0].shape[1]
    order = [
        torch.tensor([sorted(range(vocab), key=lambda j, e=e: (-e[j], j)) for e in x.tolist()])
        for x in logits
    ]
    top = torch.stack([o[:, :k] for o in order], dim=1)
    final = top[:, -1]
    position = [o.argsort(-1) for o in order]  # place of every id in the order
    ranks = torch.stack([p.gather(-1, final) + 1 for p in position], dim=1)
    logprobs = torch.stack(
        [x.log_softmax(-1).gather(-1, o[:, :k]) for x, o in zip(logits, order, strict=True)], 1
    )
    return top, ranks, logprobs, logits


def test_exact_logits_are_correctly_rounded_sums(small_vocab_model):
    model = small_vocab_model
    g = torch.Generator().manual_seed(0)
    x = reference_normed(model, 3 * torch.randn(25, 32, generator=g))
    ids = torch.randint(0, 97, (25, 9), generator=g)
    got = ranking.exact_logits(x, model.W_U.detach(), model.b_U.detach(), ids)
    weight, bias = model.W_U.detach().double(), model.b_U.detach().double()
    for t in range(25):
        for i, j in enumerate(ids[t].tolist()):
            exact = math.fsum([*(x[t].double() * weight[:, j]).tolist(), float(bias[j])])
            assert abs(float(got[t, i]) - exact) <= 1e-14 * (1 + abs(exact))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_lens_topk_matches_the_exact_reference(small_vocab_model, k, precision, emulate_bf16):
    model = small_vocab_model
    L = model.cfg.n_layers
    g = torch.Generator().manual_seed(k)
    resid = 3 * torch.randn(40, L, model.cfg.d_model, generator=g)
    got = ranking.lens_topk(bt.LogitLens(model), resid, range(L), k, precision=precision)
    top, ranks, logprobs, logits = reference_readout(model, resid, k)
    assert torch.equal(got.top_ids, top)
    within = ranks <= k
    assert torch.equal(got.final_ranks[within], ranks[within])
    assert (got.final_ranks[~within] > k).all()
    # beyond k: off by at most the tokens whose logits lie within e_j + e_t of the token's,
    # e the fast GEMM's worst-case error (fp32: d u |x||w_j| + 2u|E_j|; bf16: the rounding of
    # x and W to bf16 and of the output, 2^-8 relative each, generously doubled)
    x = reference_normed(model, resid).double()  # [t, l, d]
    norms = x.norm(dim=-1)[..., None] * model.W_U.detach().double().norm(dim=0)  # [t, l, vocab]
    unit = 2.0**-24 * model.cfg.d_model * 1.01 if precision == "fp32" else 2 * 3 * 2.0**-8
    for t, l, i in zip(*torch.nonzero(~within, as_tuple=True), strict=True):
        e = logits[l][t]
        fast_error = unit * (norms[t, l] + e.abs())
        j = top[t, -1, i]
        near = int(((e - e[j]).abs() <= fast_error + fast_error[j]).sum())
        assert abs(int(got.final_ranks[t, l, i]) - int(ranks[t, l, i])) <= near
    error = (got.top_logprobs.double() - logprobs).abs()
    assert (error <= got.logprob_error.double()[..., None]).all()


def test_ranks_agree_with_top_ids(small_vocab_model, emulate_bf16):
    model = small_vocab_model
    resid = 2 * torch.randn(60, 4, 32, generator=torch.Generator().manual_seed(5))
    for precision in ("fp32", "bf16"):
        r = ranking.lens_topk(bt.LogitLens(model), resid, range(4), 5, precision=precision)
        final = r.final_ids[:, None, :, None]  # [t, 1, i, 1]
        at = r.top_ids[:, :, None, :] == final  # [t, l, i, r]: final token i at place r
        inside = at.any(-1)
        place = at.to(torch.int64).argmax(-1) + 1
        assert torch.equal(inside, r.final_ranks <= 5)
        assert torch.equal(r.final_ranks[inside], place[inside])


def tied_model():
    """The small-vocab model with exact ties and one-ulp near-ties at the top of every row.

    Columns 2, 5 and 9 are identical with a large bias (exact ties: order 2, 5, 9); column 12
    is column 11 with one weight moved by one ulp (the order of 11 and 12 then depends on the
    sign of the residual's coordinate, at a logit difference near 1e-8).
    """
    model = make_tiny_model(n_layers=4, d_model=32, d_vocab=97, seed=3)
    with torch.no_grad():
        w, b = model.W_U, model.b_U
        for j in (5, 9):
            w[:, j] = w[:, 2]
        w[:, 12] = w[:, 11]
        w[3, 12] = torch.nextafter(w[3, 11], torch.tensor(math.inf))
        b[[2, 5, 9, 11, 12]] = 40.0
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exact_ties_and_ulp_near_ties(precision, emulate_bf16):
    model = tied_model()
    resid = torch.randn(30, 4, 32, generator=torch.Generator().manual_seed(1))
    got = ranking.lens_topk(bt.LogitLens(model), resid, range(4), 6, precision=precision)
    top, ranks, _, logits = reference_readout(model, resid, 6)
    assert torch.equal(got.top_ids, top)
    within = ranks <= 6
    assert torch.equal(got.final_ranks[within], ranks[within])
    first = got.top_ids[..., :5].tolist()
    for row in first:
        for layer_ids in row:
            tied = [j for j in layer_ids if j in (2, 5, 9)]
            assert tied == sorted(tied)  # equal logits: the lower id first
    # the near-tie is decided by the exact logits in both directions across rows
    x3 = reference_normed(model, resid[:, 0])[:, 3]
    e = logits[0]
    assert ((e[:, 12] > e[:, 11]) == (x3 > 0)).all()
    assert (x3 > 0).any() and (x3 < 0).any()
    assert got.n_exact_rows > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_row_reads_the_same_in_any_batch_chunk_and_thread_count(
    precision, tiny_model, monkeypatch, emulate_bf16
):
    model = tiny_model  # the real 49,152-token vocabulary
    L = model.cfg.n_layers
    g = torch.Generator().manual_seed(11)
    pool = 4 * torch.randn(200, L, model.cfg.d_model, generator=g)
    lens = bt.LogitLens(model)
    threads = torch.get_num_threads()
    alone = ranking.lens_topk(lens, pool[:1], range(L), 5, precision=precision)
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for size in (1, 2, 3, 5, 64, 129):
                rows = torch.randperm(199, generator=g)[: size - 1] + 1  # other rows around it
                batch = torch.cat([pool[rows[: size // 2]], pool[:1], pool[rows[size // 2 :]]])
                where = size // 2 if size > 1 else 0
                got = ranking.lens_topk(lens, batch, range(L), 5, precision=precision)
                assert torch.equal(got.top_ids[where], alone.top_ids[0])
                ranks = got.final_ranks[where].clamp_max(6)
                assert torch.equal(ranks, alone.final_ranks[0].clamp_max(6))
    finally:
        torch.set_num_threads(threads)
    # chunking of the exact evaluation
    monkeypatch.setattr(ranking, "_EXACT_CHUNK_ELEMENTS", 64)
    chunked = ranking.lens_topk(lens, pool[:20], range(L), 5, precision=precision)
    whole = ranking.lens_topk(lens, pool[:20], range(L), 5, precision="fp32")
    assert torch.equal(chunked.top_ids, whole.top_ids)
    assert torch.equal(chunked.final_ranks.clamp_max(6), whole.final_ranks.clamp_max(6))


def test_error_bounds_hold_against_float64():
    """Every fast logit lies within its bound of the exact one, including outlier columns and
    large inputs; and the bounds are of the order of the rounding, not vacuous."""
    g = torch.Generator().manual_seed(1)
    d, vocab = 576, 3000
    weight = torch.randn(d, vocab, generator=g) * 0.1
    weight[:, :20] *= 8  # outlier columns
    bias = torch.randn(vocab, generator=g)
    x = torch.randn(64, d, generator=g) * torch.logspace(-1, 1.5, 64)[:, None]
    x[:, :3] *= 30  # outlier dimensions
    exact = x.double() @ weight.double() + bias.double()
    emb = ranking._Unembedding.of_tensors(weight, bias, "bf16")
    row_norm = ranking._row_norm(x)[:, None]
    fp32 = x @ weight + bias
    err32 = ranking._fp32_error(fp32, emb.gamma * row_norm, emb.col_norm)
    assert ((fp32.double() - exact).abs() <= err32.double()).all()
    # the blocks the bf16 path reads again in fp32 (grouped GEMMs; the last block is short)
    blocks = torch.stack([torch.randperm(vocab // 64, generator=g)[:9] for _ in x])
    blocks[:5, 0] = vocab // 64  # the short last block
    entries, valid = ranking._block_entries(blocks, vocab)
    assert int((~valid).sum()) == 5 * (64 - vocab % 64)
    values = ranking._block_logits(x, emb, blocks)
    entry_error = ranking._fp32_error(values, emb.gamma * row_norm, emb.col_norm[entries])
    gap = (values.double() - exact.gather(-1, entries)).abs()
    assert (gap <= entry_error.double())[valid].all()
    x16 = x.to(torch.bfloat16)
    x16d = x16.double()
    row_input = ((x.double() - x16d).norm(dim=-1) + emb.gamma * x16d.norm(dim=-1)).float()
    y = (x16 @ emb.weight16).float()
    err16 = ranking._bf16_error(
        y, bias, row_input[:, None] * ranking._SAFETY, row_norm, emb.col_norm16, emb.col_error
    )
    assert ((y + bias - exact).abs() <= err16.double()).all()
    scale = (x.norm(dim=-1)[:, None] * weight.norm(dim=0)[None, :]).double()
    assert ((err32.double() / scale).median()) < 2 * d * 2.0**-24
    assert ((err16.double() / scale).median()) < 4 * 2.0**-8


# ---------------------------------------------------------------------------------------------
# The trained model
# ---------------------------------------------------------------------------------------------


def test_the_afterlife_position_1_layer_23(smollm2, emulate_bf16):
    """fp32 GEMMs give ',' and '.' equal logits here; float64 says ',' wins by ~1e-5."""
    model = smollm2
    comma, period = bt.tokenize(model, ",")[0], bt.tokenize(model, ".")[0]
    _, resid = prompt_residuals(model, "The afterlife")
    x = ranking.normed_residual(bt.LogitLens(model), resid[1, 23][None], 23)[0].double()
    weight = model.W_U.detach().double()
    values = {j: math.fsum((x * weight[:, j]).tolist()) for j in (comma, period)}
    assert values[comma] > values[period]
    for precision in ("fp32", "bf16"):
        traj = bt.trajectory(model, "The afterlife", precision=precision)
        assert traj.top_ids[1, 23, 0] == comma and traj.top_ids[1, 23, 1] == period


def test_bf16_ranks_within_k_on_a_short_prompt(smollm2, emulate_bf16):
    fp32 = bt.trajectory(smollm2, "Paris is", precision="fp32")
    bf16 = bt.trajectory(smollm2, "Paris is", precision="bf16")
    assert np.array_equal(fp32.top_ids, bf16.top_ids)
    assert np.array_equal(np.minimum(fp32.final_ranks, 6), np.minimum(bf16.final_ranks, 6))
    assert (bf16.final_ranks[:, -1] == np.arange(1, 6)).all()
    assert np.abs(fp32.top_logprobs - bf16.top_logprobs).max() <= 0.1


def test_scans_agree_across_precision_batch_and_threads(smollm2, emulate_bf16):
    """The public API: same top-k ids, in-top-k ranks and s_1..s_k for every configuration."""
    texts = bt.wiki_texts(2, split="val", seed=7)
    texts += ["Paris", "The afterlife", "Paris is the", "In 1969 the", "Water boils at"]
    threads = torch.get_num_threads()
    results = []
    try:
        for precision, batch_size, n_threads in (
            ("fp32", 1, 1),
            ("fp32", 8, 2),
            ("bf16", 8, 1),
            ("bf16", 1, 2),
        ):
            torch.set_num_threads(n_threads)
            results.append(
                bt.scan(
                    smollm2,
                    texts,
                    k=5,
                    max_len=16,
                    batch_size=batch_size,
                    precision=precision,
                    score_first=True,  # a one-token prompt has a row; the sink is a hard case
                    progress=False,
                )
            )
    finally:
        torch.set_num_threads(threads)
    reference = results[0]
    assert reference.saturation["pos"].eq(0).sum() == len(texts)
    for other in results[1:]:
        np.testing.assert_array_equal(other.top_ids, reference.top_ids)
        np.testing.assert_array_equal(
            np.minimum(other.final_ranks, 6), np.minimum(reference.final_ranks, 6)
        )
        np.testing.assert_array_equal(other.saturation_array(), reference.saturation_array())
