import copy
import json

import pytest
import torch

from memoe.adapters import factorize, load_lora
from memoe.editors import make_editor


def test_factorize_is_exact_at_the_delta_rank():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(16, 3, generator=g) @ torch.randn(3, 40, generator=g)
    B, A, dropped = factorize(d)  # the numerical rank by default
    assert B.shape == (16, 3) and A.shape == (3, 40) and dropped < 1e-6
    assert torch.allclose(B @ A, d, atol=1e-5)
    B, A, dropped = factorize(d, 2)
    assert A.shape == (2, 40) and 0.01 < dropped < 1


def test_lora_export_keeps_a_full_rank_edit(tiny_testbed, tmp_path):
    """FT changes the whole down-projection: the export must not cut it at rank = number of edits (it did, and the
    new targets' probabilities fell from ~0.7 to ~0.004 after the round trip)."""
    tb = tiny_testbed
    reqs = [r.request for r in tb.dataset.records[:4]]
    base = copy.deepcopy(tb.model)
    ids = torch.tensor([tb.tokenizer(reqs[0].text)["input_ids"]])
    result = make_editor("ft").apply(tb.model, tb.tokenizer, reqs)
    try:
        edited = tb.model(ids).logits
        out = result.save_lora(tmp_path / "ft-adapter")
        assert min(json.loads((out / "adapter_config.json").read_text())["rank_pattern"].values()) > len(reqs)
        with pytest.warns(UserWarning, match="drops"):
            result.save_lora(tmp_path / "ft-rank4", rank=4)
    finally:
        result.restore()
    assert torch.allclose(load_lora(base, out)(input_ids=ids).logits, edited, atol=1e-4)


@pytest.mark.parametrize("name, extra", [("memit", {"layers": [0, 1], "mom2_update_weight": 10.0, "rounds": 1}), ("rome", {"layers": [0]})])
def test_lora_round_trip(name, extra, tiny_testbed, tmp_path):
    tb = tiny_testbed
    reqs = [r.request for r in tb.dataset.records[:3]]
    base = copy.deepcopy(tb.model)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.tensor([tb.tokenizer(reqs[0].text)["input_ids"]])
    result = make_editor(name, overrides={"stats_samples": 2000, "stats_cache": str(tmp_path / "s"), **extra}).apply(tb.model, tb.tokenizer, reqs)
    try:
        edited = tb.model(ids).logits
        out = result.save_lora(tmp_path / "adapter")
    finally:
        result.restore()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["rank_pattern"].values()) == {3}
    peft_model = load_lora(base, out)
    assert torch.allclose(peft_model(input_ids=ids).logits, edited, atol=1e-4)
    assert not torch.allclose(tb.model(ids).logits, edited, atol=1e-3)
    restored = peft_model.unload()
    assert all(torch.equal(original[k], v) for k, v in restored.state_dict().items())
    assert torch.equal(restored(ids).logits, tb.model(ids).logits)


def test_inject_and_remove_lora_give_the_model_back_bit_for_bit(tiny_testbed):
    from memoe.adapters.lora import inject_lora, lora_layers, remove_lora
    from memoe.training.alignment import AlignConfig, lora_config

    model = tiny_testbed.model
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # a flag inject_lora's freezing must not lose
    names, flags = list(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tiny_testbed.tokenizer("Meli Sugi plays the")["input_ids"]])
    probe = model(ids).logits
    layers = inject_lora(model, lora_config(AlignConfig()))
    assert len(layers) == 3 * model.config.num_hidden_layers and torch.equal(model(ids).logits, probe)  # B = 0
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.fill_(0.1)
    assert not torch.allclose(model(ids).logits, probe)
    remove_lora(model)
    assert not lora_layers(model) and list(model.state_dict()) == names and not hasattr(model, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(ids).logits, probe)


def test_lora_target_modules_that_do_not_exist_are_named(tiny_testbed):
    from memoe.adapters.lora import inject_lora, lora_layers
    from memoe.config import ConfigError
    from memoe.training.alignment import AlignConfig, lora_config

    with pytest.raises(ConfigError, match="nope_proj"):
        inject_lora(tiny_testbed.model, lora_config(AlignConfig(target_modules=["nope_proj"])))
    assert not lora_layers(tiny_testbed.model)
