"""ROME and MEMIT on a real pretrained model (SmolLM2-135M-Instruct, shipped CounterFact records): its shipped
configs flip facts it knows, and restore gives the model back bit for bit. About a minute on 2 CPU cores."""

import pytest
import torch

from memoe.data import load_edit_dataset
from memoe.editors import make_editor
from memoe.evaluation.scoring import score_pairs
from memoe.models import load_model

#: Fewer covariance tokens than the shipped configs' 100,000: the test checks the edit, not C0's precision.
QUICK = {"stats_samples": 20_000}


@pytest.fixture(scope="module")
def smollm2_known():
    """The model and three of the first shipped records whose true target it prefers (so an edit must flip them)."""
    model, tok = load_model("smollm2-135m", device="cpu")
    known = [r.request for r in load_edit_dataset("counterfact-sample", limit=12).records
             if prefers_new(model, tok, [r.request]) == [False]][:3]
    assert len(known) == 3
    return model, tok, known


def prefers_new(model, tok, reqs) -> list[bool]:
    prompts = [r.text for r in reqs]
    new = score_pairs(model, tok, prompts, [r.target_new for r in reqs]).nll
    true = score_pairs(model, tok, prompts, [r.target_true for r in reqs]).nll
    return [a < b for a, b in zip(new, true)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rome", "memit"])
def test_shipped_smollm2_configs_flip_known_facts_and_restore(name, smollm2_known):
    model, tok, reqs = smollm2_known
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = score_pairs(model, tok, [r.text for r in reqs], [r.target_new for r in reqs]).nll
    result = make_editor(name, overrides=QUICK, model_key="smollm2-135m").apply(model, tok, reqs)
    assert prefers_new(model, tok, reqs) == [True] * 3
    assert result.info["target_nll_after"] < result.info["target_nll_before"] - 1.0
    result.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert score_pairs(model, tok, [r.text for r in reqs], [r.target_new for r in reqs]).nll == probe
