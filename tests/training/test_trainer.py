import copy
import json

import pytest
import torch

from memoe.adapters import MEMoEAdapter, MEMoEConfig, detach
from memoe.evaluation.metrics import compute_metrics, raw_scores
from memoe.training import AdapterTrainingModule, SafetensorsCheckpointIO, TrainConfig, TrainerOptions, build_rows, fit_adapter

# The tiny testbed looks facts up at the prompt's last token (its causal trace): edit from the anchor on.
ADAPTER = MEMoEConfig(layers=[0], num_experts=4, top_k=2, rank=16, scope="after_anchor")


def setup_adapter(tb, n=6):
    model = copy.deepcopy(tb.model)
    recs = tb.dataset.records[:n]
    adapter = MEMoEAdapter.create(model, tb.tokenizer, copy.deepcopy(ADAPTER)).attach(model)
    adapter.add_anchors(tb.tokenizer, [r.request.subject for r in recs])
    return model, adapter, recs


def test_rows_mask_the_prompt_and_carry_the_subject_span(tiny_testbed):
    tok = tiny_testbed.tokenizer
    req = tiny_testbed.dataset.records[0].request
    rows = build_rows(tok, [req], ["It rained."], ["{} is a"], seed=0)
    edit = [r for r in rows if r.kind == "edit"]
    assert len(edit) == 2 and len([r for r in rows if r.kind == "kl"]) == 1
    for r in edit:
        assert tok.decode(r.ids[-r.n_target:]).strip() == req.target_new
        assert tok.decode(r.ids[r.span[0] : r.span[1]]).strip() == req.subject


def test_training_learns_edits_and_touches_only_the_adapter(tiny_testbed):
    model, adapter, recs = setup_adapter(tiny_testbed)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    module = AdapterTrainingModule(model, adapter, TrainConfig())
    opt = module.configure_optimizers()
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in adapter.parameters()} and trained.isdisjoint(id(p) for p in model.parameters())
    pre = raw_scores(model, tiny_testbed.tokenizer, recs)
    info = fit_adapter(model, tiny_testbed.tokenizer, adapter, [r.request for r in recs], TrainConfig(lr=0.02, max_steps=150))
    post = compute_metrics(raw_scores(model, tiny_testbed.tokenizer, recs), pre)
    assert post["cf_efficacy"] == 1.0 and info["steps"] <= 150
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    assert not adapter.training  # back to noise-free routing
    detach(model)


def test_resume_from_a_checkpoint_continues_the_same_run(tiny_testbed, tmp_path):
    tok = tiny_testbed.tokenizer
    cfg = TrainConfig(lr=0.02, max_steps=8, batch_size=6, stop_loss=0.0)  # 18 rows: 3 steps per epoch
    model, a1, recs = setup_adapter(tiny_testbed)
    reqs = [r.request for r in recs]
    fit_adapter(model, tok, a1, reqs, TrainConfig(**{**cfg.__dict__, "max_steps": 12}))
    straight = {k: v.clone() for k, v in a1.state_dict().items()}
    model2, a2, _ = setup_adapter(tiny_testbed)
    ck = tmp_path / "ck"
    fit_adapter(model2, tok, a2, reqs, TrainConfig(**{**cfg.__dict__, "max_steps": 6}), TrainerOptions(checkpoint_dir=str(ck)))
    assert (ck / "last.json").exists() and (ck / "last.safetensors").exists()
    meta = json.loads((ck / "last.json").read_text())
    assert meta["__dict__"][0][0]  # JSON tree, tensors stored apart
    model3, a3, _ = setup_adapter(tiny_testbed)  # a new process would start from a fresh adapter
    info = fit_adapter(model3, tok, a3, reqs, TrainConfig(**{**cfg.__dict__, "max_steps": 12}),
                       TrainerOptions(checkpoint_dir=str(ck), resume="last"))
    assert info["steps"] == 12
    for k, v in a3.state_dict().items():
        assert torch.allclose(v, straight[k], atol=1e-6), k


def test_checkpoint_io_round_trip_without_pickle(tmp_path):
    io = SafetensorsCheckpointIO()
    ck = {"state_dict": {"a.w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "loops": {"x": [1, 2.5, None, "s"]},
          "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}]}
    io.save_checkpoint(ck, tmp_path / "c.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.safetensors"]
    back = io.load_checkpoint(tmp_path / "c.ckpt")
    assert torch.equal(back["state_dict"]["a.w"], ck["state_dict"]["a.w"]) and back["epoch"] == 3
    assert back["loops"] == ck["loops"] and torch.equal(back["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(2))
    (tmp_path / "c.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        io.load_checkpoint(tmp_path / "c.ckpt")


def test_other_relation_kl_rows_use_the_requests_subject(tiny_testbed):
    tok = tiny_testbed.tokenizer
    reqs = [r.request for r in tiny_testbed.dataset.records[:6]]
    rows = build_rows(tok, reqs, [], [], seed=0, kl_other_relations=2)
    kl = [r for r in rows if r.kind == "kl"]
    assert len(kl) == 2 * len(reqs)
    for r in kl:
        req = reqs[r.request]
        text = tok.decode(r.ids, skip_special_tokens=True)
        assert tok.decode(r.ids[r.span[0] : r.span[1]]).strip() == req.subject
        assert text != req.text and not any(o.relation == req.relation and o.text == text for o in reqs)
    assert len([r for r in build_rows(tok, reqs, [], [], seed=0) if r.kind == "kl"]) == 0


def test_same_relation_rows_ask_the_requests_fact_in_the_batchs_other_wordings(tiny_testbed):
    tok = tiny_testbed.tokenizer
    reqs = [r.request for r in tiny_testbed.dataset.records[:40]]
    plain = [r for r in build_rows(tok, reqs, [], [], seed=0) if r.kind == "edit"]
    rows = [r for r in build_rows(tok, reqs, [], [], seed=0, same_relation=2) if r.kind == "edit"]
    assert len(plain) == len(reqs) < len(rows) <= 3 * len(reqs)
    extra = 0
    for r in rows:
        req = reqs[r.request]
        prompt = tok.decode(r.ids[: len(r.ids) - r.n_target], skip_special_tokens=True)
        assert tok.decode(r.ids[r.span[0]: r.span[1]]).strip() == req.subject
        assert tok.decode(r.ids[len(r.ids) - r.n_target:]).strip() == req.target_new
        if prompt != req.text:  # an added row: a template another request of the same relation uses
            extra += 1
            assert any(o.relation == req.relation and o.prompt.replace("{}", req.subject) == prompt for o in reqs)
    assert extra == len(rows) - len(reqs)


def test_cached_kl_references_give_the_per_step_loss(tiny_testbed):
    """The base's KL references are computed once before training; a step's loss is the one recomputing them gives."""
    from memoe.training.data import collate

    model, adapter, recs = setup_adapter(tiny_testbed)
    tok = tiny_testbed.tokenizer
    rows = build_rows(tok, [r.request for r in recs], ["It rained."], ["{} is a", "{} was born in"], seed=0)
    module = AdapterTrainingModule(model, adapter, TrainConfig(kl_factor=1.0, aux_factor=0.0), rows)
    module.kl_ref = module._kl_references()
    assert sorted(module.kl_ref) == sorted(r.index for r in rows if r.kind == "kl")
    with torch.no_grad():  # the adapter's experts start at zero: give them weight, so the KL term is not zero
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    batch = collate(rows[3:15], tok.pad_token_id)
    assert len(batch["kl_rows"])
    module.log = lambda *a, **k: None
    cached = module.training_step(batch, 0)
    module.kl_ref = None
    recomputed = module.training_step(batch, 0)
    assert cached.item() > 0 and cached.item() == pytest.approx(recomputed.item(), rel=1e-5)
    detach(model)


@pytest.mark.parametrize("layer,scope", [(0, "anchor"), (2, "anchor"), (1, "relation"), (3, "after_anchor")])
def test_a_step_from_the_frozen_prefix_is_the_whole_rows_step(tiny_testbed, layer, scope):
    """Training runs each row only from what the adapter can change on (the blocks from its layer, the tokens from
    the anchor's last one); the loss and the adapter's gradients are those of the whole rows through the whole model."""
    from dataclasses import replace

    from memoe.training.data import collate

    tb, tok = tiny_testbed, tiny_testbed.tokenizer
    model = copy.deepcopy(tb.model)
    recs = tb.dataset.records[:6]
    cfg = replace(ADAPTER, layers=[layer], scope=scope, router_noise=0.0)
    adapter = MEMoEAdapter.create(model, tok, cfg).attach(model)
    adapter.add_anchors(tok, [r.request.subject for r in recs])
    rows = build_rows(tok, [r.request for r in recs], ["It rained."], ["{} is a"], seed=0)
    module = AdapterTrainingModule(model, adapter, TrainConfig(kl_factor=1.0, aux_factor=0.1), rows)
    module.log = lambda *a, **k: None
    with torch.no_grad():  # the experts start at zero: give them weight, so every term moves
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    adapter.train()
    module.kl_ref = module._kl_references()
    batch = collate(rows[2:16], tok.pad_token_id)

    def step():
        adapter.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}

    whole, whole_grads = step()
    module.prefix = module._frozen_prefix()
    assert module.prefix is not None and module.prefix.first == layer
    assert all(module.heads[r.index] == r.span[1] - 1 for r in rows)  # MEMoE changes nothing before that token
    tail, tail_grads = step()
    assert tail == pytest.approx(whole, rel=1e-5)
    assert whole_grads.keys() == tail_grads.keys() and whole_grads
    for n, g in whole_grads.items():
        assert torch.allclose(tail_grads[n], g, rtol=1e-4, atol=1e-6), n
    module.kl_ref = None  # the per-step KL references run the same way
    assert step()[0] == pytest.approx(whole, rel=1e-5)
    detach(model)


def test_other_relation_rows_never_ask_a_fact_the_batch_also_edits_for_that_subject():
    from memoe.data.records import EditRequest
    from memoe.training.data import relation_templates

    # Ada's home and employer are both edited: neither may be the other's "keep this" row.
    reqs = [EditRequest("{} lives in", "Ada", "Paris", "Rome", 1, relation="P1"),
            EditRequest("{} works for", "Ada", "IBM", "BBC", 2, relation="P2"),
            EditRequest("{} was born in", "Cy", "Oslo", "Lima", 3, relation="P3"),
            EditRequest("{} resides in", "Dee", "Oslo", "Lima", 4, relation="P1")]
    import random

    assert relation_templates(reqs, 0, 5, random.Random(0), same=False) == ["{} was born in"]
    assert sorted(relation_templates(reqs, 2, 5, random.Random(0), same=False)) == ["{} lives in", "{} resides in", "{} works for"]
