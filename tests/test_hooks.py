"""The hooks package: each factory changes exactly the cells it names, against unhooked runs
and a plain-Python reference; hooks never outlive their context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model

from beyond_top1.activations import mean_activation, mean_from_stream
from beyond_top1.hooks._common import hook_name
from hooks import (
    HookNameError,
    add_vector,
    copy_position,
    copy_positions,
    fwd_hooks,
    mean_ablate,
    patched,
    record,
    record_positions,
    replace_at_positions,
    zero_ablate,
)

RESID = "blocks.1.hook_resid_post"
Z = "blocks.1.attn.hook_z"


@pytest.fixture(scope="module", params=["RMS", "LN"])
def model(request):
    return make_tiny_model(normalization=request.param, d_vocab=97, seed=3)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def clean_run(model, tokens):
    return model.run_with_cache(tokens)


def hooked_run(model, tokens, name, fn):
    """Logits and the activation at ``name`` as the next layer sees it (after ``fn``)."""
    store = {}
    logits = model.run_with_hooks(tokens, fwd_hooks=[(name, fn), (name, record(store))])
    assert no_hooks_left(model)
    return logits, store[name]


def reference(activation, cells):
    """Plain-Python reference: ``cells`` is {(b, p): value} with normalised indices."""
    out = activation.clone()
    for (b, p), value in cells.items():
        out[b, p] = value
    return out


def assert_only_cells_changed(model, tokens, name, fn, cells):
    """The hooked activation equals the reference; every logit before the first changed
    position of a row (causal attention), and every row without a changed cell, is unchanged."""
    clean_logits, cache = clean_run(model, tokens)
    logits, act = hooked_run(model, tokens, name, fn)
    expected = reference(cache[name], cells)
    assert torch.equal(act, expected)
    changed = [(r, p) for (r, p) in cells if not torch.equal(expected[r, p], cache[name][r, p])]
    for b in range(tokens.shape[0]):
        first = min([p for (r, p) in changed if r == b], default=tokens.shape[1])
        assert torch.equal(logits[b, :first], clean_logits[b, :first])
        if first < tokens.shape[1]:
            assert not torch.equal(logits[b, first], clean_logits[b, first])


# --- record ------------------------------------------------------------------------------------


def test_record_matches_run_with_cache(model):
    tokens = torch.tensor([[1, 2, 3, 4]])
    store = {}
    logits = model.run_with_hooks(tokens, fwd_hooks=[(RESID, record(store))])
    clean, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(store[RESID], cache[RESID])
    torch.testing.assert_close(logits, clean)
    assert no_hooks_left(model)


def test_record_positions(model, tokens):
    _, cache = clean_run(model, tokens)
    store = {}
    model.run_with_hooks(tokens, fwd_hooks=[(RESID, record_positions(store, [-1, 2]))])
    assert torch.equal(store[RESID], cache[RESID][:, [8, 2]])
    model.run_with_hooks(tokens, fwd_hooks=[(Z, record_positions(store, [(2, 0), (0, -2)]))])
    assert torch.equal(store[Z], torch.stack([cache[Z][2, 0], cache[Z][0, 7]]))
    with pytest.raises(ValueError, match="mix"):
        record_positions(store, [1, (0, 2)])


# --- replace_at_positions -----------------------------------------------------------------------


def test_replace_every_row_and_one_row(model, tokens):
    d = model.cfg.d_model
    v, w = torch.randn(d), torch.randn(d)
    fn = replace_at_positions({4: v, (1, -1): w})
    cells = {(b, 4): v for b in range(3)} | {(1, 8): w}
    assert_only_cells_changed(model, tokens, RESID, fn, cells)


def test_replace_one_vector_per_row(model, tokens):
    vs = torch.randn(3, model.cfg.d_model)
    cells = {(b, 6): vs[b] for b in range(3)}
    assert_only_cells_changed(model, tokens, RESID, replace_at_positions({6: vs}), cells)


def test_replace_on_z_hook(model, tokens):
    v = torch.randn(model.cfg.n_heads, model.cfg.d_head)
    fn = replace_at_positions({(0, 5): v})
    assert_only_cells_changed(model, tokens, Z, fn, {(0, 5): v})


def test_replace_moves_dtype(model, tokens):
    v = torch.randn(model.cfg.d_model, dtype=torch.float64)
    fn = replace_at_positions({3: v})
    cells = {(b, 3): v.float() for b in range(3)}
    assert_only_cells_changed(model, tokens, RESID, fn, cells)


def test_patching_own_activation_reproduces_the_clean_run(model, tokens):
    clean_logits, cache = clean_run(model, tokens)
    own = {(b, p): cache[RESID][b, p] for b in range(3) for p in (2, 7)}
    logits = model.run_with_hooks(tokens, fwd_hooks=[(RESID, replace_at_positions(own))])
    assert torch.equal(logits, clean_logits)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(RESID, copy_position(5, 5))])
    assert torch.equal(logits, clean_logits)


# --- copy_position ------------------------------------------------------------------------------


def test_copy_position_equals_replace_with_clean_source(model, tokens):
    _, cache = clean_run(model, tokens)
    src, tgt = 2, 6
    manual = replace_at_positions({tgt: cache[RESID][:, src]})
    copied = model.run_with_hooks(tokens, fwd_hooks=[(RESID, copy_position(src, tgt))])
    replaced = model.run_with_hooks(tokens, fwd_hooks=[(RESID, manual)])
    assert torch.equal(copied, replaced)
    cells = {(b, tgt): cache[RESID][b, src] for b in range(3)}
    assert_only_cells_changed(model, tokens, RESID, copy_position(src, tgt), cells)


def test_copy_positions_batch_aware(model, tokens):
    _, cache = clean_run(model, tokens)
    act = cache[RESID]
    fn = copy_positions({(0, 7): 1, (1, 5): (2, 3), 8: (0, 0), (2, 4): (2, 4)})
    cells = {(0, 7): act[0, 1], (1, 5): act[2, 3], (2, 4): act[2, 4]}
    cells |= {(b, 8): act[0, 0] for b in range(3)}
    assert_only_cells_changed(model, tokens, RESID, fn, cells)


def test_copy_reads_sources_before_writing(model, tokens):
    _, cache = clean_run(model, tokens)
    act = cache[RESID]
    fn = copy_positions({3: 2, 2: 1})
    cells = {(b, 3): act[b, 2] for b in range(3)} | {(b, 2): act[b, 1] for b in range(3)}
    assert_only_cells_changed(model, tokens, RESID, fn, cells)


# --- steering and ablation ----------------------------------------------------------------------


def test_add_vector_at_positions(model, tokens):
    _, cache = clean_run(model, tokens)
    act, v = cache[RESID], torch.randn(model.cfg.d_model)
    fn = add_vector(v, positions=[1, (2, -1)], scale=2.5)
    cells = {(b, 1): act[b, 1] + 2.5 * v for b in range(3)} | {(2, 8): act[2, 8] + 2.5 * v}
    assert_only_cells_changed(model, tokens, RESID, fn, cells)


def test_add_vector_everywhere_and_gradient(model, tokens):
    _, cache = clean_run(model, tokens)
    v = torch.randn(model.cfg.d_model, requires_grad=True)
    logits, act = hooked_run(model, tokens, RESID, add_vector(v, scale=-1.0))
    torch.testing.assert_close(act, cache[RESID] - v.detach(), rtol=0, atol=0)
    logits.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_zero_ablate(model, tokens):
    _, cache = clean_run(model, tokens)
    zero = torch.zeros(model.cfg.n_heads, model.cfg.d_head)
    cells = {(b, 0): zero for b in range(3)} | {(1, 4): zero}
    assert_only_cells_changed(model, tokens, Z, zero_ablate([0, (1, 4)]), cells)
    _, act = hooked_run(model, tokens, RESID, zero_ablate())
    assert torch.equal(act, torch.zeros_like(cache[RESID]))


def test_mean_ablate_global_and_per_position(model, tokens):
    ref = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    _, ref_cache = model.run_with_cache(ref)
    mu = mean_activation(ref_cache, RESID)
    mu_pos = mean_activation(ref_cache, RESID, per_position=True)
    cells = {(b, 5): mu for b in range(3)}
    assert_only_cells_changed(model, tokens, RESID, mean_ablate(mu, [5]), cells)
    cells = {(0, 2): mu_pos[2], (0, 8): mu_pos[8]}
    assert_only_cells_changed(model, tokens, RESID, mean_ablate(mu_pos, [(0, 2), (0, -1)]), cells)
    with pytest.raises(IndexError, match="covers positions 0..3"):
        model.run_with_hooks(tokens, fwd_hooks=[(RESID, mean_ablate(mu_pos[:4], [5]))])
    with pytest.raises(ValueError, match="not finite"):
        nan = torch.full_like(mu_pos, float("nan"))
        model.run_with_hooks(tokens, fwd_hooks=[(RESID, mean_ablate(nan, [1]))])
    assert no_hooks_left(model)


def test_mean_activation_matches_loops():
    acts = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    rows = [acts[b, p] for b in range(3) for p in range(5) if mask[b, p]]
    torch.testing.assert_close(mean_activation(acts, mask=mask), torch.stack(rows).mean(0))
    per_pos = mean_activation(acts, mask=mask, per_position=True)
    for p in range(5):
        want = torch.stack([acts[b, p] for b in range(3) if mask[b, p]]).mean(0)
        torch.testing.assert_close(per_pos[p], want)
    torch.testing.assert_close(mean_activation({"h": acts}, "h"), acts.mean((0, 1)))


def test_mean_from_stream_matches_concatenation():
    gen = torch.Generator().manual_seed(3)
    batches = []
    for n in (5, 7):
        resid = torch.randn(n, 2, 4, generator=gen)
        positions = torch.randint(1, 6, (n,), generator=gen)
        batches.append(
            SimpleNamespace(at=lambda l, r=resid: r[:, [3, 7].index(l)], positions=positions)
        )
    flat = torch.cat([b.at(7) for b in batches])
    pos = torch.cat([b.positions for b in batches])
    torch.testing.assert_close(mean_from_stream(batches, 7), flat.mean(0))
    per_pos = mean_from_stream(batches, 7, per_position=True)
    assert per_pos.shape == (int(pos.max()) + 1, 4)
    assert torch.isnan(per_pos[0]).all()
    for p in pos.unique():
        torch.testing.assert_close(per_pos[p], flat[pos == p].mean(0))


# --- in-place safety ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda d: replace_at_positions({2: torch.ones(d)}),
        lambda d: copy_position(0, 2),
        lambda d: add_vector(torch.ones(d), [2]),
        lambda d: add_vector(torch.ones(d)),
        lambda d: zero_ablate([2]),
        lambda d: zero_ablate(),
        lambda d: mean_ablate(torch.ones(d), [2]),
    ],
)
def test_factories_never_write_into_their_input(model, tokens, factory):
    _, cache = clean_run(model, tokens)
    seen = {}
    fn = factory(model.cfg.d_model)
    model.run_with_hooks(tokens, fwd_hooks=[(RESID, record(seen, detach=False)), (RESID, fn)])
    assert torch.equal(seen[RESID], cache[RESID])
    assert no_hooks_left(model)


# --- errors -------------------------------------------------------------------------------------


def test_clear_errors(model, tokens):
    d = model.cfg.d_model
    cases = [
        (replace_at_positions({9: torch.zeros(d)}), IndexError, r"position 9 .*valid: -9\.\.8"),
        (replace_at_positions({(3, 0): torch.zeros(d)}), IndexError, "batch index 3"),
        (replace_at_positions({0: torch.zeros(d + 1)}), ValueError, rf"must have shape \({d},\)"),
        (replace_at_positions({(0, 1): torch.zeros(3, d)}), ValueError, "must have shape"),
        (replace_at_positions({1: torch.zeros(d), (0, -8): torch.zeros(d)}), ValueError, "twice"),
        (copy_position(source=-10, target=0), IndexError, "position -10"),
        (add_vector(torch.zeros(d)), ValueError, r"blocks.1.attn.hook_z"),
    ]
    for fn, error, match in cases:
        name = Z if match.startswith("blocks.1.attn") else RESID
        with pytest.raises(error, match=match):
            model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])
        assert no_hooks_left(model)
    with pytest.raises(ValueError, match="query_pos"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", zero_ablate([1]))])
    with pytest.raises(TypeError, match="ambiguous"):
        zero_ablate((0, 3))
    with pytest.raises(TypeError, match="int"):
        replace_at_positions({"3": torch.zeros(d)})
    with pytest.raises(ValueError, match="empty"):
        add_vector(torch.zeros(d), positions=[])


def test_fwd_hooks_builder_checks_names(model, tokens):
    store = {}
    built = fwd_hooks((1, record(store)), (-1, record(store)), model=model)
    assert [name for name, _ in built] == [RESID, "blocks.0.hook_resid_pre"]
    with pytest.raises(HookNameError, match=r"Did you mean: blocks\.1\.hook_resid_post"):
        fwd_hooks(("blocks.1.hook_resid_pots", record(store)), model=model)
    with pytest.raises(HookNameError, match="blocks.7.hook_resid_post"):
        fwd_hooks((7, record(store)), model=model)
    with pytest.raises(HookNameError, match="matches no hook point"):
        fwd_hooks((lambda n: n.endswith("nope"), record(store)), model=model)
    with pytest.raises(TypeError, match="forget to call the factory"):
        fwd_hooks((RESID, torch.zeros(3)))


# --- cleanup ------------------------------------------------------------------------------------


def test_patched_removes_its_hooks_on_error_and_keeps_user_hooks():
    model = make_tiny_model(d_vocab=97, n_layers=2)
    tokens = torch.tensor([[1, 2, 3, 4]])
    calls = []
    model.add_hook(RESID, lambda act, hook: calls.append("user") and None)
    model.add_perma_hook("blocks.0.hook_resid_post", lambda act, hook: calls.append("perma"))

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with patched(model, [(RESID, boom), ("blocks.0.hook_mlp_out", zero_ablate())]):
            model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[(RESID, boom)])
    with pytest.raises(HookNameError):  # validated before anything is added
        with patched(model, [(RESID, boom), ("blocks.9.hook_resid_post", boom)]):
            pass
    with patched(model, [(0, zero_ablate())]):  # an outer context survives an inner error
        with pytest.raises(RuntimeError):
            with patched(model, [(RESID, boom)]):
                model(tokens)
        assert len(model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks) == 2
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()  # a bridge: aliases too
    counts = {hook_name(hp): len(hp.fwd_hooks) for hp in points if hp.fwd_hooks}
    assert counts == {"blocks.0.hook_resid_post": 1, RESID: 1}
    calls.clear()
    model(tokens)
    assert calls == ["perma", "user"]
    model.reset_hooks(including_permanent=True)
    assert no_hooks_left(model)


def test_the_hooks_package_stands_alone(tmp_path):
    """``import hooks`` works in a fresh interpreter, imports nothing but itself and torch from
    the toolkit's side, and a user's own hooks.py cannot break ``import beyond_top1``."""
    import subprocess
    import sys

    check = (
        "import sys, hooks, beyond_top1.hooks as h\n"
        "assert hooks.copy_position is h.copy_position\n"
        "toolkit = sorted(m for m in sys.modules if m.startswith('beyond_top1'))\n"
        "assert toolkit == ['beyond_top1', 'beyond_top1.hooks'] + sorted(\n"
        "    m for m in toolkit if m.startswith('beyond_top1.hooks.')), toolkit\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (tmp_path / "hooks.py").write_text("raise RuntimeError('the user hooks.py was imported')\n")
    result = subprocess.run(
        [sys.executable, "-c", "import beyond_top1, beyond_top1.hooks; print('ok')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_deprecated_names_warn_and_still_work(model, tokens):
    import hooks
    from beyond_top1.activations import mean_activation as moved

    with pytest.warns(DeprecationWarning, match="beyond_top1.activations"):
        assert hooks.mean_activation is moved
    with pytest.warns(DeprecationWarning, match="linear_replacement_hooks"):
        pairs = hooks.linear_replacement(RESID, RESID)
    assert [name for name, _ in pairs] == [RESID]
