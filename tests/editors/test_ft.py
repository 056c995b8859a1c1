
from memoe.editors import make_editor
from memoe.evaluation.scoring import score_pairs


def test_ft_writes_the_new_targets_within_the_norm_ball(tiny_testbed):
    tb = tiny_testbed
    reqs = [r.request for r in tb.dataset.records[:4]]
    ed = make_editor("ft", overrides={"layers": [0], "steps": 40, "norm_constraint": 0.05, "lr": 0.01})
    before = score_pairs(tb.model, tb.tokenizer, [r.text for r in reqs], [r.target_new for r in reqs])
    result = ed.apply(tb.model, tb.tokenizer, reqs)
    try:
        after = score_pairs(tb.model, tb.tokenizer, [r.text for r in reqs], [r.target_new for r in reqs])
        assert sum(after.nll) < sum(before.nll) / 2
        assert sum(after.exact) >= 2 and sum(before.exact) == 0
        (name, delta), = result.deltas.items()
        assert name == "model.layers.0.mlp.down_proj.weight"
        assert delta.abs().max() <= 0.05 + 1e-6
        assert result.info["losses"][-1] < result.info["losses"][0]
    finally:
        result.restore()
