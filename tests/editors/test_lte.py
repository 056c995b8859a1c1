import pytest
import torch

from memoe.adapters.lora import lora_layers
from memoe.batching import in_context
from memoe.editors import make_editor
from memoe.editors.lte import attached_memory, load_memory
from memoe.errors import MissingFileError
from memoe.evaluation.harness import run_mode
from memoe.evaluation.metrics import ScoreOptions
from memoe.evaluation.scoring import score_pairs
from memoe.retrieval import in_context_prompt
from memoe.training.alignment import AlignConfig, AlignRow, fit_alignment, save_alignment

from ..markers import needs_shared_data


def test_sequential_edits_grow_the_index_and_restore_removes_exactly_theirs(tiny_testbed):
    tb = tiny_testbed
    r1, r2 = [r.request for r in tb.dataset.records[:2]], [tb.dataset.records[2].request]
    ed = make_editor("lte")
    first = ed.apply(tb.model, tb.tokenizer, r1)
    second = ed.apply(tb.model, tb.tokenizer, r2)
    mem = attached_memory(tb.model)
    assert mem.index.texts == [f"{r.text} {r.target_new}" for r in r1 + r2]
    assert in_context(tb.model, [r2[0].text]) == [in_context_prompt(r2[0].text, [f"{r2[0].text} {r2[0].target_new}"])]
    second.restore()
    assert mem.index.texts == [f"{r.text} {r.target_new}" for r in r1] and mem.index.keys.shape[0] == 2
    first.restore()
    assert attached_memory(tb.model) is None and in_context(tb.model, [r2[0].text]) == [r2[0].text]


def test_the_saved_index_gives_the_same_predictions(tiny_testbed, tmp_path):
    tb = tiny_testbed
    recs = tb.dataset.records[:4]
    prompts = [p for r in recs for p in (r.request.text, *r.paraphrase_prompts)]
    targets = [r.request.target_new for r in recs for _ in range(1 + len(r.paraphrase_prompts))]
    result = make_editor("lte", overrides={"top_k": 2}).apply(tb.model, tb.tokenizer, [r.request for r in recs])
    edited = score_pairs(tb.model, tb.tokenizer, prompts, targets)
    attached_memory(tb.model).save(tmp_path / "mem")
    result.restore()
    assert score_pairs(tb.model, tb.tokenizer, prompts, targets).nll != edited.nll
    mem = load_memory(tb.model, tb.tokenizer, tmp_path / "mem")
    assert mem.config.top_k == 2 and score_pairs(tb.model, tb.tokenizer, prompts, targets).nll == edited.nll
    mem.detach()


def test_the_aligned_lora_is_attached_once_and_detached_with_the_last_restore(tiny_testbed, tmp_path):
    tb = tiny_testbed
    rows = [AlignRow(r.request.text, r.request.target_new, "in-scope") for r in tb.dataset.records[30:34]]
    fit_alignment(tb.model, tb.tokenizer, rows, AlignConfig(max_steps=3, batch_size=4, lr=1e-2))
    save_alignment(tb.model, AlignConfig(), tmp_path / "lora")
    aligned_probe = tb.model(torch.tensor([tb.tokenizer("Meli Sugi plays the")["input_ids"]])).logits
    from memoe.adapters.lora import remove_lora
    remove_lora(tb.model)
    before = {k: v.clone() for k, v in tb.model.state_dict().items()}
    ed = make_editor("lte", overrides={"lora": str(tmp_path / "lora"), "encoder": "base"})
    a = ed.apply(tb.model, tb.tokenizer, [tb.dataset[0].request])
    b = ed.apply(tb.model, tb.tokenizer, [tb.dataset[1].request])
    assert len(lora_layers(tb.model)) == 3 * tb.model.config.num_hidden_layers  # once, not per edit
    assert torch.allclose(tb.model(torch.tensor([tb.tokenizer("Meli Sugi plays the")["input_ids"]])).logits, aligned_probe)
    b.restore()
    assert lora_layers(tb.model)
    a.restore()
    assert not lora_layers(tb.model) and all(torch.equal(before[k], v) for k, v in tb.model.state_dict().items())


def test_a_missing_lora_folder_is_named(tiny_testbed, tmp_path):
    ed = make_editor("lte", overrides={"lora": str(tmp_path / "nowhere")})
    with pytest.raises(MissingFileError, match="nowhere.*train.py --align"):
        ed.apply(tiny_testbed.model, tiny_testbed.tokenizer, [tiny_testbed.dataset[0].request])
    assert attached_memory(tiny_testbed.model) is None


@pytest.mark.parametrize("mode", ["single", "batch", "sequential", "sequential-batch"])
def test_every_mode_runs_and_leaves_the_model_unedited(tiny_testbed, mode):
    tb = tiny_testbed
    before = {k: v.clone() for k, v in tb.model.state_dict().items()}
    res = run_mode(make_editor("lte"), tb.model, tb.tokenizer, tb.dataset.records[:4], mode, batch_size=2,
                   score=ScoreOptions(fluency_prompts=0, generation=False, stress=False, perplexity_texts=0), progress=False)
    assert res.num_edits == 4 and (res.final is not None) == mode.startswith("sequential")
    assert attached_memory(tb.model) is None and all(torch.equal(before[k], v) for k, v in tb.model.state_dict().items())
    view = res.final or res.current
    assert view["cf_efficacy"] >= res.pre["cf_efficacy"]


@pytest.mark.slow
@needs_shared_data
def test_retrieval_alone_flips_real_counterfact_facts_on_smollm2():
    """In-context editing of a real model: the retrieved statement makes SmolLM2 prefer the new targets of requests
    and paraphrases it did not prefer before; restore gives the model back."""
    from memoe.data import load_edit_dataset
    from memoe.models import load_model

    model, tok = load_model("smollm2-135m")
    recs = load_edit_dataset("counterfact", limit=6).records
    prompts = [p for r in recs for p in (r.request.text, r.paraphrase_prompts[0])]
    new = [r.request.target_new for r in recs for _ in range(2)]
    true = [r.request.target_true for r in recs for _ in range(2)]
    prefers_new = lambda: [a < b for a, b in zip(score_pairs(model, tok, prompts, new).nll, score_pairs(model, tok, prompts, true).nll)]
    before, probe = prefers_new(), score_pairs(model, tok, prompts, new).nll
    result = make_editor("lte", overrides={"lora": None}).apply(model, tok, [r.request for r in recs])
    after = prefers_new()
    assert sum(after) >= 10 and sum(after) > sum(before) + 5
    result.restore()
    assert score_pairs(model, tok, prompts, new).nll == probe
