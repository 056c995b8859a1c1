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
