import warnings

import pytest
import torch

from memoe.batching import in_context
from memoe.config import ConfigError
from memoe.data import EditRequest, RecordError
from memoe.editors import REGISTRY, make_editor
from memoe.editors.base import EditorConfig, WeightEditor, apply_deltas


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def logits(tb, text):
    """The model's logits for ``text`` as memoe queries it (after an in-context editor's retrieved edits, if any)."""
    ids = torch.tensor([tb.tokenizer(in_context(tb.model, [text])[0])["input_ids"]])
    return tb.model(ids).logits


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_editor_edits_and_restores_bit_for_bit(name, tiny_testbed):
    tb = tiny_testbed
    reqs = [r.request for r in tb.dataset.records[:3]]
    before, probe = snapshot(tb.model), logits(tb, reqs[0].text)
    result = make_editor(name).apply(tb.model, tb.tokenizer, reqs)
    assert not torch.equal(logits(tb, reqs[0].text), probe)  # it did edit
    assert result.seconds > 0 and result.requests == reqs
    result.restore()
    after = snapshot(tb.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(tb, reqs[0].text), probe)
    result.restore()  # idempotent
    assert all(torch.equal(before[k], v) for k, v in snapshot(tb.model).items())


def test_stacked_edits_restore_in_reverse(tiny_testbed):
    tb = tiny_testbed
    before = snapshot(tb.model)
    ed = make_editor("ft")
    r1 = ed.apply(tb.model, tb.tokenizer, [tb.dataset[0].request])
    r2 = ed.apply(tb.model, tb.tokenizer, [tb.dataset[1].request])
    r2.restore()
    r1.restore()
    assert all(torch.equal(before[k], v) for k, v in snapshot(tb.model).items())


@pytest.mark.parametrize("bad, match", [
    ([], "no edit requests"),
    ([EditRequest("{} was born in", "Nobody", "Paris", "Rome", case_id=9)], None),
    ([EditRequest("Ada was born in", "Kedo Meli", "Paris", "Rome", case_id=9)], "does not occur in prompt"),
    ([EditRequest("{} was born in", "Kedo Meli", "", "Rome", case_id=9)], "empty target"),
])
def test_bad_requests_fail_clearly_and_leave_model_unchanged(bad, match, tiny_testbed):
    tb = tiny_testbed
    before = snapshot(tb.model)
    if match is None:  # a subject that is fine: no error
        make_editor("ft").apply(tb.model, tb.tokenizer, bad).restore()
    else:
        with pytest.raises((ValueError, RecordError), match=match):
            make_editor("ft").apply(tb.model, tb.tokenizer, bad)
    assert all(torch.equal(before[k], v) for k, v in snapshot(tb.model).items())


def test_layer_out_of_range_fails_before_any_change(tiny_testbed):
    tb = tiny_testbed
    before = snapshot(tb.model)
    with pytest.raises(IndexError, match="layer 40 out of range"):
        make_editor("ft", overrides={"layers": [40]}).apply(tb.model, tb.tokenizer, [tb.dataset[0].request])
    assert all(torch.equal(before[k], v) for k, v in snapshot(tb.model).items())


def test_bad_config_key_and_value_are_named():
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        make_editor("ft", overrides={"stepz": 3})
    with pytest.raises(ConfigError, match="'lr'"):
        make_editor("ft", overrides={"lr": -1.0})
    with pytest.raises(KeyError, match="unknown editor 'nope'"):
        make_editor("nope")


def test_apply_deltas_checks_shapes(tiny_testbed):
    with pytest.raises(ValueError, match="has shape"):
        apply_deltas(tiny_testbed.model, {"model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2)}, "x")
    with pytest.raises(KeyError, match="unknown parameter"):
        apply_deltas(tiny_testbed.model, {"nope": torch.zeros(2)}, "x")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_make_editor_gives_the_shipped_config(name):
    """One source of defaults: ``make_editor(name)`` is ``--editor name``, the shipped YAML."""
    from memoe.config import from_dict
    from memoe.editors import read_editor_config
    from memoe.resources import editor_config_path

    method, data = read_editor_config(editor_config_path(name))
    assert method == name and make_editor(name).config == from_dict(REGISTRY[name].Config, data)


def test_an_editor_yaml_must_name_its_method(tmp_path):
    (tmp_path / "a.yaml").write_text("layers: [0]\n")
    with pytest.raises(ConfigError, match="a.yaml: an editor config names its method"):
        make_editor("ft", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("method: rome\nlayers: [0]\n")
    with pytest.raises(ConfigError, match="b.yaml configures 'rome', not 'ft'"):
        make_editor("ft", tmp_path / "b.yaml")


class _Delta(WeightEditor):
    """A weight editor that adds ``scale`` times a fixed random direction to the last down-projection."""

    name = "delta-spy"
    Config = EditorConfig

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def compute_deltas(self, model, tok, requests):
        name, w = [(n, p) for n, p in model.named_parameters() if n.endswith("down_proj.weight")][-1]
        return {name: self.scale * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))}, {}


def test_an_edit_that_moves_nothing_is_reported(tiny_testbed):
    """EasyEdit's shipped Llama λ left SmolLM2 unchanged without a word; memoe warns, naming the editor."""
    tb = tiny_testbed
    reqs = [r.request for r in tb.dataset.records[:2]]
    with pytest.warns(UserWarning, match="delta-spy: the edit left all 2 requests' new-target NLL unchanged"):
        result = _Delta(0.0).apply(tb.model, tb.tokenizer, reqs)
    assert result.info["target_nll_before"] == result.info["target_nll_after"]
    result.restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real change is not reported
        result = _Delta(1.0).apply(tb.model, tb.tokenizer, reqs)
    assert result.info["target_nll_before"] != result.info["target_nll_after"]
    result.restore()
