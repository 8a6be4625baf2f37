"""The hooks package works with run_with_hooks and leaves the model unchanged."""

from __future__ import annotations

import torch

from hooks import record


def test_record_matches_run_with_cache(tiny_model):
    tokens = torch.tensor([[1, 2, 3, 4]])
    store = {}
    name = "blocks.1.hook_resid_post"
    logits = tiny_model.run_with_hooks(tokens, fwd_hooks=[(name, record(store))])
    clean, cache = tiny_model.run_with_cache(tokens)
    torch.testing.assert_close(store[name], cache[name])
    torch.testing.assert_close(logits, clean)
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())
