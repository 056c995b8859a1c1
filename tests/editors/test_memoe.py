import copy

import torch

from memoe.adapters import attached
from memoe.editors import make_editor
from memoe.evaluation.harness import run_mode

CFG = {"adapter": {"layers": [0], "num_experts": 4, "rank": 16, "scope": "after_anchor"}, "train": {"lr": 0.02, "max_steps": 120}, "replay": 4}


def test_memoe_editor_in_batch_and_sequential_modes(tiny_testbed):
    model = copy.deepcopy(tiny_testbed.model)
    tok, recs = tiny_testbed.tokenizer, tiny_testbed.dataset.records[:6]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = make_editor("memoe", overrides=CFG)
    batch = run_mode(editor, model, tok, recs, "batch", 6, progress=False)
    assert batch.current["cf_efficacy"] == 1.0 and batch.current["cf_neighbourhood"] >= batch.pre["cf_neighbourhood"] - 0.05
    assert attached(model) == []  # restore detached the adapter it created
    seq = run_mode(editor, model, tok, recs, "sequential-batch", 3, progress=False)
    assert seq.final["cf_efficacy"] >= 0.8 and seq.restores == 2
    assert attached(model) == [] and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sequential_apply_keeps_one_adapter_and_restore_rewinds_it(tiny_testbed):
    model = copy.deepcopy(tiny_testbed.model)
    tok, recs = tiny_testbed.tokenizer, tiny_testbed.dataset.records[:4]
    editor = make_editor("memoe", overrides={**CFG, "train": {"max_steps": 5, "stop_loss": 0.0}})
    r1 = editor.apply(model, tok, [r.request for r in recs[:2]])
    adapter = editor.adapter(model)
    after_first = {k: v.clone() for k, v in adapter.state_dict().items()}
    r2 = editor.apply(model, tok, [r.request for r in recs[2:]])
    assert editor.adapter(model) is adapter and attached(model) == [adapter] and len(adapter.trie) == 4
    r2.restore()
    assert len(adapter.trie) == 2 and all(torch.equal(v, after_first[k]) for k, v in adapter.state_dict().items())
    r1.restore()
    assert attached(model) == [] and editor.adapter(model) is None
