import copy
import json

import pytest
import torch

from memoe.adapters import AdapterError, MEMoEAdapter, MEMoEConfig, attached, detach
from memoe.adapters.bypass import RoutingContext
from memoe.editors import attach, load_adapter
from memoe.models.mini import llama3_mini_config


@pytest.fixture
def base(tiny_testbed):
    """A private copy of the tiny testbed's model (tests attach adapters to it)."""
    return copy.deepcopy(tiny_testbed.model), tiny_testbed.tokenizer


def batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def randomise(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def anchored(anchor_pos, anchor_id):
    """A routing context by hand: each token's anchor position and id (B, T), every token in scope."""
    ctx = RoutingContext()
    ctx.anchor_pos, ctx.anchor_id, ctx.mask = anchor_pos, anchor_id, torch.ones(anchor_id.shape, dtype=torch.bool)
    return ctx


def make(model, tok, subjects, **cfg):
    a = MEMoEAdapter.create(model, tok, MEMoEConfig(**{"layers": [1], **cfg})).attach(model)
    a.add_anchors(tok, subjects)
    return a


def test_fresh_adapter_changes_nothing_and_detach_is_exact(base, tiny_testbed):
    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    ids, mask = batch(tok, [f"{subj} lives in", "The river is"])
    ref = model(input_ids=ids, attention_mask=mask).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = make(model, tok, [subj], scope="after_anchor")
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    randomise(a)
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    detach(model)
    assert attached(model) == [] and torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(state)  # hooks, not wrappers: parameter names unchanged


@pytest.mark.parametrize("rank", [4, None])
def test_gates_sum_to_one_over_top_k(base, tiny_testbed, rank):
    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    a = make(model, tok, [subj], num_experts=5, top_k=3, rank=rank, gate_unanchored=False)
    randomise(a)
    ids, mask = batch(tok, [f"{subj} lives in", "The river is wide"])
    model(input_ids=ids, attention_mask=mask)
    g = a.layers["1"].last_gates  # (B, T, E)
    assert torch.allclose(g.sum(-1), torch.ones(g.shape[:2]), atol=1e-6)
    assert ((g > 0).sum(-1) == 3).all()


def test_gate_off_inputs_get_exactly_the_base_output(base, tiny_testbed):
    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    other = tiny_testbed.dataset.records[-1].request.subject
    assert subj != other
    ids, mask = batch(tok, [f"{other} lives in", f"{subj} lives in"])
    ref = model(input_ids=ids, attention_mask=mask).logits
    a = make(model, tok, [subj], scope="after_anchor")
    randomise(a)
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out[0], ref[0])  # no known anchor: the base, bit for bit
    start, end = a.trie.find(ids[1].tolist())[0]
    assert torch.equal(out[1, : end - 1], ref[1, : end - 1])  # before the anchor ends: untouched (causal)
    assert not torch.allclose(out[1, end - 1 :], ref[1, end - 1 :])
    a.config.gate_unanchored = False
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits[0], ref[0])


def changed_positions(model, tok, subj, text, scope, **cfg):
    """Positions whose layer-1 MLP output a randomised adapter of ``scope`` changes, and the anchor's end."""
    ids, mask = batch(tok, [text])
    a = make(model, tok, [subj], scope=scope, **cfg)
    randomise(a)
    seen = {}
    h = model.model.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with a.disabled():
        model(input_ids=ids, attention_mask=mask)
    plain = seen.pop("out")
    model(input_ids=ids, attention_mask=mask)
    h.remove()
    changed = (seen["out"] != plain).any(-1)[0].nonzero().flatten().tolist()
    return changed, a.trie.find(ids[0].tolist())[0][1], ids.shape[1]


def test_scope_anchor_edits_only_the_anchors_last_token(base, tiny_testbed):
    subj = tiny_testbed.dataset.records[0].request.subject
    changed, end, _ = changed_positions(*base, subj, f"{subj} lives in", "anchor")
    assert changed == [end - 1]


def test_scope_relation_edits_only_the_tokens_after_the_anchor(base, tiny_testbed):
    subj = tiny_testbed.dataset.records[0].request.subject
    changed, end, length = changed_positions(*base, subj, f"{subj} lives in the", "relation")
    assert changed == list(range(end, length))  # the relation's tokens, not the subject's


def test_sentence_reach_ends_the_anchors_routing_at_its_sentence_end(base, tiny_testbed):
    subj = tiny_testbed.dataset.records[0].request.subject
    text = f"{subj} lives in Rome. The river is"
    changed, end, length = changed_positions(*base, subj, text, "after_anchor", anchor_reach="sentence")
    stop = end + len(base[1](" lives in Rome.", add_special_tokens=False)["input_ids"]) - 1
    assert changed == list(range(end - 1, stop + 1))  # the subject's sentence, up to its full stop, and no further
    everywhere, _, _ = changed_positions(*base, subj, text, "after_anchor")
    assert everywhere == list(range(end - 1, length))


def test_null_experts_take_their_gate_share_to_no_output(base, tiny_testbed):
    """A token routed only to null experts gets the base output bit for bit; half to a real expert, half the change."""
    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    ids, mask = batch(tok, [f"{subj} lives in"])
    ref = model(input_ids=ids, attention_mask=mask).logits
    a = make(model, tok, [subj], num_experts=2, null_experts=2, top_k=2, scope="after_anchor")
    randomise(a)
    layer = a.layers["1"]
    assert layer.router.shape[0] == 4 and layer.A.shape[0] == 2

    def fixed(weights):
        def gates(x, anchor):
            g = torch.tensor(weights).expand(*x.shape[:2], 4)
            return g, g
        return gates

    layer.gates = fixed([0.0, 0.0, 0.5, 0.5])
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    layer.gates = fixed([0.5, 0.0, 0.5, 0.0])
    half = model(input_ids=ids, attention_mask=mask).logits
    layer.gates = fixed([1.0, 0.0, 0.0, 0.0])
    full = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(half, ref) and not torch.allclose(half, full)


def test_save_then_attach_on_a_fresh_base_reproduces_logits(base, tiny_testbed, tmp_path):
    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    ids, mask = batch(tok, [f"{subj} lives in", "The river is"])
    a = make(model, tok, [subj, "Some Entity"], scope="after_anchor")
    randomise(a)
    want = model(input_ids=ids, attention_mask=mask).logits
    a.save(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["method"] == "memoe" and meta["config"]["layers"] == [1] and "Some Entity" in meta["anchors"]["texts"]
    assert meta["base_model"]["fingerprint"] and meta["base_model"]["model_type"] == "llama"
    fresh = copy.deepcopy(tiny_testbed.model)
    b = attach(fresh, tmp_path / "ad", strict=True)
    assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)
    detach(fresh, b)
    assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, tiny_testbed.model(input_ids=ids, attention_mask=mask).logits)


def test_cached_generation_routes_new_tokens_by_the_earlier_anchor(base, tiny_testbed):
    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    a = make(model, tok, [subj], scope="after_anchor")
    randomise(a, seed=3)
    enc = tok([f"{subj} lives in"], return_tensors="pt")
    fast = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    slow = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, use_cache=False)
    assert torch.equal(fast, slow)


def test_attach_to_a_mismatched_base_raises(base, tiny_testbed, tmp_path):
    from transformers import LlamaForCausalLM

    model, tok = base
    make(model, tok, ["Some Entity"]).save(tmp_path / "ad")
    other = LlamaForCausalLM(llama3_mini_config(vocab_size=512, hidden_size=32, layers=4))
    with pytest.raises(AdapterError, match="hidden_size=64.*hidden_size=32"):
        attach(other, tmp_path / "ad")
    edited = copy.deepcopy(tiny_testbed.model)
    with torch.no_grad():
        edited.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(AdapterError, match="fingerprint"):
        attach(edited, tmp_path / "ad", strict=True)
    with pytest.warns(UserWarning, match="fingerprint"):
        detach(edited, attach(edited, tmp_path / "ad"))


def test_corrupt_or_mismatched_files_are_named(base, tmp_path):
    model, tok = base
    a = make(model, tok, ["Some Entity"])
    a.save(tmp_path / "ad")
    cfg = tmp_path / "ad" / "adapter_config.json"
    good = cfg.read_text()
    cfg.write_text(good[:50])
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(tmp_path / "ad")
    meta = json.loads(good)
    meta["config"]["rank"] = 8
    cfg.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="'layers.1.A' has shape"):
        load_adapter(tmp_path / "ad")
    cfg.write_text(good)
    w = tmp_path / "ad" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_adapter(tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path / "nothing")


DELETE = object()


@pytest.mark.parametrize("key, value, message", [
    ("anchors", DELETE, "key 'anchors' must be"),        # deleted: used to attach as a silent no-op
    ("anchors", "garbage", "key 'anchors' must be"),     # used to raise AttributeError
    ("version", "1", "key 'version' must be of type int"),     # used to raise TypeError
    ("version", None, "key 'version' must be of type int"),
    ("base_model", DELETE, "missing key 'base_model'"),  # used to raise KeyError
    ("config", DELETE, "missing key 'config'"),
])
def test_damaged_adapter_config_is_refused_with_its_key(base, tmp_path, key, value, message):
    model, tok = base
    make(model, tok, ["Some Entity"]).save(tmp_path / "ad")
    cfg = tmp_path / "ad" / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    if value is DELETE:
        del meta[key]
    else:
        meta[key] = value
    cfg.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=f"adapter_config.json: .*{message}"):
        load_adapter(tmp_path / "ad")


def test_the_same_folder_is_not_attached_twice_by_accident(base, tiny_testbed, tmp_path):
    """Attaching one folder twice stacked it and doubled the edit without a word."""
    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    randomise(make(model, tok, [subj]))
    attached(model)[0].save(tmp_path / "ad")
    fresh = copy.deepcopy(tiny_testbed.model)
    attach(fresh, tmp_path / "ad")
    with pytest.raises(AdapterError, match="already attached.*allow_duplicate=True"):
        attach(fresh, tmp_path / "ad")
    assert len(attached(fresh)) == 1
    attach(fresh, tmp_path / "ad", allow_duplicate=True)  # deliberately: stacked
    assert len(attached(fresh)) == 2
    detach(fresh)
    attach(fresh, tmp_path / "ad")  # detached, so attaching again is fine


def test_attach_to_a_llama3_checkpoint_directory(tiny_testbed, tmp_path):
    """The Llama-3 code path: a checkpoint directory loaded by memoe.load_model, adapter saved and re-attached."""
    from transformers import LlamaForCausalLM

    from memoe.models import load_model

    tok = tiny_testbed.tokenizer
    torch.manual_seed(0)
    LlamaForCausalLM(llama3_mini_config(vocab_size=len(tok))).save_pretrained(tmp_path / "llama3")
    tok.save_pretrained(tmp_path / "llama3")
    model, tok3 = load_model(tmp_path / "llama3", "float32", "cpu")
    a = make(model, tok3, ["Kalo Mira"], scope="after_anchor")
    randomise(a)
    ids, mask = batch(tok3, ["Kalo Mira lives in"])
    want = model(input_ids=ids, attention_mask=mask).logits
    a.save(tmp_path / "ad")
    fresh, _ = load_model(tmp_path / "llama3", "float32", "cpu")
    attach(fresh, tmp_path / "ad", strict=True)
    assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)


def test_an_ner_detector_plugs_in_beside_the_trie(base, tiny_testbed):
    from memoe.adapters.anchors import EntityDetector

    model, tok = base
    subj = tiny_testbed.dataset.records[0].request.subject
    ids, mask = batch(tok, [f"{subj} lives in"])
    ref = model(input_ids=ids, attention_mask=mask).logits
    a = make(model, tok, [], scope="after_anchor")  # the trie knows no anchor: the bypass stays off
    randomise(a)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    a.detectors.append(EntityDetector(tok, lambda text: [{"start": text.index(subj), "end": text.index(subj) + len(subj)}]))
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


def test_relation_gate_opens_only_where_the_token_asks_the_stored_question():
    """Hand-built: anchor 0's stored key is e0, anchor 1's is e1. The same anchor under two questions (e0, e1) gets two
    gates, open and shut; a token with no anchor, or whose anchor has no key, gets exactly the base output."""
    from memoe.adapters.moe import MoELayer

    H = 8
    layer = MoELayer(H, MEMoEConfig(layers=[0], num_experts=2, top_k=1, rank=2, relation_keys=4, relation_key_rank=H,
                                    scope="after_anchor")).eval()  # noise-free routing
    with torch.no_grad():
        layer.key_proj.copy_(torch.eye(H))
        layer.B.fill_(0.5)  # every expert writes something
    eye = torch.eye(H)
    layer.claim_keys([0, 1], torch.stack([eye[0], eye[1]]))
    assert layer.key_owner.tolist() == [0, 1, -1, -1]
    x = torch.stack([eye[0], 3 * eye[0] + 0.1 * eye[5], eye[1], eye[1], eye[0]])[None]  # (1, 5, H)
    # no anchor; anchor 0 asked e0 (scaled), e1; anchor 1 asked e1; 2: no key
    ctx = anchored(torch.tensor([[-1, 0, 0, 0, 0]]), torch.tensor([[-1, 0, 0, 1, 2]]))
    out = torch.zeros(1, 5, H)
    y = layer(x, out, ctx)
    rho = layer.relation_gate[0]
    assert rho[1] > 0.99 and rho[3] > 0.99  # the stored question, whatever its norm
    assert rho[2] < 1e-3  # the same anchor asked another question
    assert rho[0] == 0 and rho[4] == 0  # no anchor / an anchor without a key
    assert torch.equal(y[0, [0, 4]], out[0, [0, 4]]) and y[0, 1].abs().sum() > 0
    assert y[0, 2].abs().max() < 1e-3 * y[0, 1].abs().max()
    layer.cfg.hard_relation_gate = True  # a switch: shut is exactly the base, open is the whole edit
    hard = layer(x, out, ctx)
    assert torch.equal(hard[0, [0, 2, 4]], out[0, [0, 2, 4]])
    assert torch.allclose(hard[0, [1, 3]], y[0, [1, 3]] / rho[[1, 3], None], rtol=1e-5)
    with pytest.raises(Exception, match="relation_keys=4: 2 free slots, 3 new keys"):
        layer.claim_keys([5, 6, 7], torch.zeros(3, H))


def test_negative_keys_shut_the_gate_on_a_question_closer_to_another_relation_of_the_anchor():
    """Hand-built: anchor 0's edit asked e0; its question e1 is stored as a negative. A token between the two, nearer
    e0, passes; the same token nearer e1 is shut, although it passes the threshold alone; anchor 1, with no
    negatives, keeps the threshold gate; and a negative key needs the option."""
    from memoe.adapters.moe import MoELayer

    H = 8
    layer = MoELayer(H, MEMoEConfig(layers=[0], num_experts=2, top_k=1, rank=2, relation_keys=4, relation_key_rank=H,
                                    relation_negatives=1, scope="after_anchor")).eval()
    with torch.no_grad():
        layer.key_proj.copy_(torch.eye(H))
        layer.key_bias.fill_(-5.0)  # open from cosine 0.25 + a margin
    eye = torch.eye(H)
    layer.claim_keys([0, 1], torch.stack([eye[0], eye[0]]))
    layer.claim_keys([0], eye[1][None], negative=True)
    assert layer.key_negative.tolist() == [False, False, True, False]
    near_e0, near_e1 = eye[0] + 0.6 * eye[1], 0.7 * eye[0] + eye[1]  # both well past e0's threshold (cosine 0.86, 0.57)
    x = torch.stack([near_e0, near_e1, near_e1])[None]  # (1, 3, H)
    ctx = anchored(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 0, 1]]))
    layer(x, torch.zeros(1, 3, H), ctx)
    rho = layer.relation_gate[0]
    assert rho[0] > 0.95  # nearer the edit's question
    assert rho[1] < 0.05  # nearer the anchor's other, stored question
    assert rho[2] > 0.95  # the same state, for an anchor with no negatives: the threshold alone
    with pytest.raises(Exception, match="relation_negatives"):
        MoELayer(H, MEMoEConfig(layers=[0], relation_keys=2)).claim_keys([0], eye[0][None], negative=True)


def test_a_gate_below_the_cut_is_shut_exactly():
    """relation_gate_cut: a token whose ρ is under the cut gets exactly the base output; one above keeps its ρ."""
    from memoe.adapters.moe import MoELayer

    H = 8
    layer = MoELayer(H, MEMoEConfig(layers=[0], num_experts=2, top_k=1, rank=2, relation_keys=2, relation_key_rank=H,
                                    relation_gate_cut=0.5, scope="after_anchor")).eval()
    with torch.no_grad():
        layer.key_proj.copy_(torch.eye(H))
        layer.B.fill_(0.5)
    eye = torch.eye(H)
    layer.claim_keys([0], eye[0][None])
    x = torch.stack([eye[0], eye[0] + 1.2 * eye[1]])[None]  # cosines 1.0 (ρ ≈ 1) and 0.64 (ρ ≈ 0.94)
    ctx = anchored(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    out = torch.zeros(1, 2, H)
    open_ = layer(x, out, ctx)
    with torch.no_grad():
        layer.key_bias.fill_(-13.0)  # now ρ ≈ 0.5 at cosine 0.64 minus a little: under the cut
    cut = layer(x, out, ctx)
    assert layer.relation_gate[0, 1] < 0.5
    assert torch.equal(cut[0, 1], out[0, 1]) and open_[0, 1].abs().sum() > 0
    assert torch.allclose(cut[0, 0], open_[0, 0], rtol=1e-2)  # open: only ρ's own small change


def test_relation_keys_are_stored_from_the_base_and_saved_with_their_anchor_ids(base, tiny_testbed, tmp_path):
    model, tok = base
    a_subj, b_subj = (r.request.subject for r in tiny_testbed.dataset.records[:2])
    a = make(model, tok, [a_subj, b_subj], scope="after_anchor", relation_keys=3)
    a.add_facts(model, tok, [b_subj], [[f"{b_subj} lives in", f"It rained. {b_subj} lives in"]])
    layer = a.layers["1"]
    assert layer.key_owner.tolist() == [1, 1, -1]  # b_subj is anchor 1
    ids, mask = batch(tok, [f"{b_subj} lives in", f"{a_subj} lives in"])
    randomise(a)
    with torch.no_grad():
        layer.key_scale.fill_(20.0)
        layer.key_bias.fill_(-10.0)
    want = model(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    rho = layer.relation_gate[torch.arange(2), last]
    assert rho[0] > 0.99 and rho[1] == 0  # the stored prompt itself; a subject with no key
    a.save(tmp_path / "ad")
    fresh = copy.deepcopy(tiny_testbed.model)
    attach(fresh, tmp_path / "ad", strict=True)
    assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)


def test_the_paper_form_has_only_the_papers_tensors_and_draws_the_same_init():
    """relation_keys = 0 (the default, the paper's form) adds no tensor and leaves the initial draw as it was, so a
    paper-form adapter trains exactly as before the relation gate existed."""
    from memoe.adapters.moe import MoELayer

    paper = MoELayer(16, MEMoEConfig(layers=[0], num_experts=3, rank=4))
    gated = MoELayer(16, MEMoEConfig(layers=[0], num_experts=3, rank=4, relation_keys=5))
    assert sorted(paper.state_dict()) == ["A", "B", "noise", "router"]
    assert sorted(set(gated.state_dict()) - set(paper.state_dict())) == ["key_bias", "key_owner", "key_proj", "key_scale", "keys"]
    assert all(torch.equal(paper.state_dict()[k], gated.state_dict()[k]) for k in paper.state_dict())
