import pytest
import torch

from memoe.tokens import fact_position, subject_span
from memoe.trace import causal_trace, trace_fact


def test_subject_span(tiny_testbed):
    tok = tiny_testbed.tokenizer
    tpl, subj = "The birthplace of {} is", tiny_testbed.world.subjects[0]
    s, e = subject_span(tok, tpl, subj)
    ids = tok(tpl.replace("{}", subj))["input_ids"]
    assert tok.decode(ids[s:e]).strip() == subj
    assert fact_position(tok, tpl, subj, "prompt_last") == len(ids) - 1
    assert fact_position(tok, "{} was born in", subj, "subject_first") == 1  # right after BOS
    with pytest.raises(ValueError, match="exactly one"):
        subject_span(tok, "no slot", subj)


def test_trace_hand_checkable(tiny_testbed):
    """Restoring the last layer's hidden state at the last token gives back the clean probability exactly;
    restoring a last-layer state at any earlier token changes nothing (no later layer reads it); with zero
    noise every restoration equals the clean run."""
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    r = tiny_testbed.dataset[0].request
    L = tiny_testbed.model.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    clean, corrupt, restored = trace_fact(model, tok, r.prompt, r.subject, r.target_true, noise_std=1.0, samples=3, generator=g)
    assert corrupt < clean
    assert restored["hidden"]["prompt_last"][L - 1] == pytest.approx(clean, abs=1e-5)
    assert restored["hidden"]["subject_last"][L - 1] == pytest.approx(corrupt, abs=1e-6)
    assert restored["mlp"]["subject_first"][L - 1] == pytest.approx(corrupt, abs=1e-6)
    c0, k0, r0 = trace_fact(model, tok, r.prompt, r.subject, r.target_true, noise_std=0.0, samples=2, generator=g)
    assert k0 == pytest.approx(c0, abs=1e-6)
    assert all(v == pytest.approx(c0, abs=1e-5) for kind in r0.values() for vals in kind.values() for v in vals)


def test_causal_trace_average_and_plot(tiny_testbed, tmp_path):
    from memoe.trace import plot_trace

    facts = [(r.request.prompt, r.request.subject, r.request.target_true) for r in tiny_testbed.dataset.records[:4]]
    res = causal_trace(tiny_testbed.model, tiny_testbed.tokenizer, facts, samples=2, progress=False)
    assert res.n_facts == 4 and res.p_clean > res.p_corrupt
    assert res.effects["hidden"]["prompt_last"][-1] == pytest.approx(res.p_clean - res.p_corrupt, abs=1e-5)
    assert set(res.peak("mlp")) == {"kind", "position", "layer", "effect"}
    plot_trace(res, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
