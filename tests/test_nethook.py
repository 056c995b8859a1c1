"""Hooks that remove themselves: memoe/nethook.py."""

import pytest
import torch

from memoe import nethook


def test_a_forward_started_from_a_cached_state_is_the_full_forward(tiny_testbed):
    """``start_after`` skips the blocks below a cached state (the closed-form target optimisation's saving)."""
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    ids = torch.tensor([tok("Kalo was born in the city of")["input_ids"]])
    names = ["model.layers.0", "model.layers.1"]
    with torch.no_grad(), nethook.capture(model, [names[-1]]) as store:
        full = model.base_model(input_ids=ids).last_hidden_state
    cached = store[names[-1]]
    with torch.no_grad(), nethook.start_after(model, names, lambda: cached):
        started = model.base_model(input_ids=ids).last_hidden_state
    assert torch.allclose(started, full, atol=1e-6)
    with torch.no_grad(), nethook.start_after(model, names, lambda: torch.zeros_like(cached)):
        assert not torch.allclose(model.base_model(input_ids=ids).last_hidden_state, full)  # the state is what is used
    assert all("forward" not in model.get_submodule(n).__dict__ for n in names)  # the blocks compute again
    with pytest.raises(RuntimeError), nethook.start_after(model, names, lambda: cached):
        raise RuntimeError("inside")
    assert all("forward" not in model.get_submodule(n).__dict__ for n in names)
    with torch.no_grad():
        assert torch.equal(model.base_model(input_ids=ids).last_hidden_state, full)
