"""BypassEditor: a saved adapter of either bypass method is attached to a fresh base and edited further; restore()
rewinds it to what was loaded, bit for bit, and the base weights never change."""

import copy

import pytest
import torch

from memoe.adapters import attached
from memoe.editors import attach, editor_class, make_editor
from memoe.editors.bypass import BypassEditor
from memoe.evaluation.metrics import compute_metrics, raw_scores

from .test_coachhook import CFG as HOOK_CFG
from .test_memoe import CFG as MOE_CFG

# replay 0: MEMoE's replay buffer lives in the editor that made the edits, so a loaded adapter starts without one
EDITORS = {"memoe": lambda: make_editor("memoe", overrides={**MOE_CFG, "replay": 0}),
           "coachhook": lambda: editor_class("coachhook")(HOOK_CFG)}


@pytest.mark.parametrize("name", list(EDITORS))
def test_a_saved_adapter_is_edited_further(name, tiny_testbed, tmp_path):
    tb = tiny_testbed
    tok, recs = tb.tokenizer, tb.dataset.records[:6]
    base = copy.deepcopy(tb.model)  # a fresh base for later: nothing attached
    first = EDITORS[name]()
    assert isinstance(first, BypassEditor)
    first.apply(tb.model, tok, [r.request for r in recs[:3]])
    first.adapter(tb.model).save(tmp_path / "ad")
    torch.manual_seed(0)
    first.apply(tb.model, tok, [r.request for r in recs[3:]])  # the reference: the same edits, continued in memory
    continued = raw_scores(tb.model, tok, recs)

    weights = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = attach(base, tmp_path / "ad")
    saved = {k: v.clone() for k, v in loaded.state_dict().items()}
    second = EDITORS[name]()
    torch.manual_seed(0)
    result = second.apply(base, tok, [r.request for r in recs[3:]])
    assert attached(base) == [loaded] and second.adapter(base) is loaded  # the loaded adapter, not a new one
    assert compute_metrics(raw_scores(base, tok, recs)) == pytest.approx(compute_metrics(continued), abs=1e-6)
    result.restore()
    assert attached(base) == [loaded]  # rewound, not detached: the edit did not create it
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert all(torch.equal(v, weights[k]) for k, v in base.state_dict().items())


def test_a_failed_edit_leaves_the_adapter_as_it_was(tiny_testbed, monkeypatch):
    tb = tiny_testbed
    editor = make_editor("memoe", overrides=MOE_CFG)
    editor.apply(tb.model, tb.tokenizer, [tb.dataset.records[0].request])
    adapter = editor.adapter(tb.model)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}

    def half_way(model, tok, adapter, requests):
        with torch.no_grad():
            next(adapter.parameters()).add_(1.0)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(editor, "edit", half_way)
    with pytest.raises(RuntimeError):
        editor.apply(tb.model, tb.tokenizer, [tb.dataset.records[1].request])
    assert all(torch.equal(v, before[k]) for k, v in adapter.state_dict().items())
