import copy
import json

import pytest
import torch

from memoe.adapters import AdapterError, MEMoEAdapter, MEMoEConfig, attached, detach
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


def changed_positions(model, tok, subj, text, scope):
    """Positions whose layer-1 MLP output a randomised adapter of ``scope`` changes, and the anchor's end."""
    ids, mask = batch(tok, [text])
    a = make(model, tok, [subj], scope=scope)
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
