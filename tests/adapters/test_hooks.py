import copy

import torch

from memoe.adapters import CoachHooKAdapter, HookConfig, detach
from memoe.adapters.bypass import RoutingContext
from memoe.adapters.hooks import HookLayer, scope_zscores
from memoe.editors import attach


def test_scope_gate_picks_exactly_the_positions_past_alpha_without_padding():
    m = torch.tensor([[1.0, 1.0, 1.0, 5.0, 0.0, 0.0],
                      [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    z = scope_zscores(m.double(), mask)
    # row 0 over its 4 real tokens: mean 2, std sqrt(3) -> z = -1/sqrt(3) x3, +3/sqrt(3); padding is -inf
    want = torch.tensor([-1, -1, -1, 3], dtype=torch.float64) / 3 ** 0.5
    assert torch.allclose(z[0, :4], want) and torch.isinf(z[0, 4:]).all()
    assert (z[1] == 0).all()  # no spread: nothing stands out
    layer = HookLayer(2, 3, HookConfig(layers=[0], alpha_init=1.5))
    ctx = RoutingContext()
    ctx.mask = mask
    assert layer.gate(m, ctx).tolist() == [[False, False, False, True, False, False], [False] * 6]


def test_empty_hook_changes_nothing_and_memory_is_fixed_size(tiny_testbed, tmp_path):
    model = copy.deepcopy(tiny_testbed.model)
    tok = tiny_testbed.tokenizer
    enc = tok(["The river is wide", "A"], return_tensors="pt", padding=True)
    ref = model(**enc).logits
    a = CoachHooKAdapter.create(model, tok, HookConfig(layers=[0, 2])).attach(model)
    assert torch.equal(model(**enc).logits, ref)
    d, H = model.config.intermediate_size, model.config.hidden_size
    assert a.memory_bytes() == 2 * (H * d * 4 + d * d * 8 + 8)
    with torch.no_grad():
        a.layers["0"].delta.normal_()
        a.layers["0"].cov.fill_(2.0)
        a.layers["0"].alpha.fill_(0.5)
    out = model(**enc).logits
    a.save(tmp_path / "h")
    detach(model)
    assert torch.equal(model(**enc).logits, ref)
    b = attach(model, tmp_path / "h")
    assert torch.equal(model(**enc).logits, out) and float(b.layers["0"].alpha) == 0.5
    assert torch.equal(b.layers["0"].cov, a.layers["0"].cov)
