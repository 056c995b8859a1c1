import torch

import memoe


def test_top_level_api_edits_and_restores(tiny_testbed):
    tb = tiny_testbed
    subject = tb.world.subjects[0]
    req = memoe.EditRequest("{} speaks", subject, "Welsh", case_id="api")
    before = {k: v.clone() for k, v in tb.model.state_dict().items()}
    result = memoe.make_editor("rome", overrides={"stats_samples": 1000}).apply(tb.model, tb.tokenizer, [req])
    assert isinstance(result, memoe.EditResult) and result.deltas
    result.restore()
    assert all(torch.equal(before[k], v) for k, v in tb.model.state_dict().items())
    assert set(memoe.REGISTRY) == {"ft", "rome", "memit", "emmet", "memoe", "coachhook", "kn", "lte"}
    assert callable(memoe.attach) and callable(memoe.detach) and callable(memoe.load_adapter)
