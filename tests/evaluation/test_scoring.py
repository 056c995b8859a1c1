"""Batched scoring: memoe/evaluation/scoring.py."""

import warnings

import pytest

from memoe.evaluation.scoring import score_pairs


def test_over_long_prompts_are_named_not_silently_scored(tiny_testbed):
    """Prompts of 815-2,017 tokens on a 256-position model used to be scored and edited without a word."""
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    limit = model.config.max_position_embeddings
    long_prompt = " ".join(["Kalo"] * (limit + 40))
    with pytest.warns(UserWarning, match=rf"1 of 2 scored prompts .* longer than the model's {limit} positions"):
        score_pairs(model, tok, [long_prompt, "Kalo was born in"], ["Paris", "Paris"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_pairs(model, tok, ["Kalo was born in"], ["Paris"])  # no warning for ordinary prompts


def test_pairs_sharing_a_prompt_score_as_if_alone(tiny_testbed):
    """One-token targets are read from a row of their prompt that another target built; every pair's scores must
    be those of scoring it alone (here: one- and many-token targets on the same prompts, and a repeated pair)."""
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    recs = tiny_testbed.dataset.records[:12]
    pairs = [(r.request.text, t) for r in recs for t in (r.request.target_new, r.request.target_true)]
    pairs += [pairs[0], (recs[0].request.text, "Zulu")]
    lengths = {len(tok(" " + t, add_special_tokens=False)["input_ids"]) for _, t in pairs}
    assert 1 in lengths and max(lengths) > 1  # both kinds present
    together = score_pairs(model, tok, [p for p, _ in pairs], [t for _, t in pairs], batch_size=5)
    for i, (p, t) in enumerate(pairs):
        alone = score_pairs(model, tok, [p], [t])
        assert together.nll[i] == pytest.approx(alone.nll[0], abs=1e-5)
        assert together.first_prob[i] == pytest.approx(alone.first_prob[0], abs=1e-6)
        assert together.token_acc[i] == alone.token_acc[0] and together.argmax[i] == alone.argmax[0]
