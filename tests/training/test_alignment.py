import pytest
import torch

from memoe.adapters.lora import lora_layers, lora_tensors, remove_lora
from memoe.data.records import EditRecord, EditRequest, LabeledPrompt
from memoe.errors import DataError
from memoe.evaluation.generation import greedy_answers
from memoe.retrieval import in_context_prompt
from memoe.training.alignment import AlignConfig, AlignRow, alignment_rows, fit_alignment, save_alignment


def record(subject, target_new, para=(), neigh=(), gen=(), loc=()):
    return EditRecord(EditRequest("{} was born in", subject, target_new, "Rome", case_id=subject), paraphrase_prompts=para,
                      neighborhood_prompts=neigh, generation_prompts=gen, locality_prompts=loc)


def test_the_parallel_dataset_of_hand_built_records():
    recs = [record("Ada", "Paris", para=("Ada's birthplace is",), neigh=("Bob was born in",), gen=("Ada is known for",)),
            record("Cy", "Oslo", loc=(LabeledPrompt("nq question: who wrote hamlet", "Shakespeare"),))]
    asked = []

    def answer(qs):
        asked.extend(qs)
        return [f"base answer to {q}" if q != "Cy was born in" else "  " for q in qs]  # an empty answer is dropped

    rows = alignment_rows(recs, AlignConfig(paraphrases=1, neighbours=1, unrelated=1, plain=1), answer)
    got = {(r.kind, r.prompt, r.target) for r in rows}
    ada, cy = "Ada was born in Paris", "Cy was born in Oslo"
    assert got == {
        ("in-scope", in_context_prompt("Ada was born in", [ada]), "Paris"),
        ("in-scope", in_context_prompt("Ada's birthplace is", [ada]), "Paris"),
        ("out-of-scope", in_context_prompt("Bob was born in", [ada]), "base answer to Bob was born in"),
        ("plain", "Ada is known for", "base answer to Ada is known for"),
        ("in-scope", in_context_prompt("Cy was born in", [cy]), "Oslo"),
        ("out-of-scope", in_context_prompt("Ada was born in", [cy]), "base answer to Ada was born in"),
        ("plain", "nq question: who wrote hamlet", "base answer to nq question: who wrote hamlet"),
    }
    # the unedited model was asked every out-of-scope and plain query bare, in one call
    assert sorted(asked) == sorted(["Bob was born in", "Cy was born in", "Ada is known for", "Ada was born in",
                                    "nq question: who wrote hamlet"])
    with pytest.raises(DataError, match="at least 2 records"):
        alignment_rows(recs[:1], AlignConfig(), answer)


def test_alignment_trains_a_lora_that_peft_loads_with_the_same_logits(tiny_testbed, tmp_path):
    import copy

    from peft import PeftModel

    tb = tiny_testbed
    model, tok = tb.model, tb.tokenizer
    base = copy.deepcopy(model)
    cfg = AlignConfig(max_steps=25, batch_size=8, lr=5e-3)
    rows = alignment_rows(tb.dataset.records[20:28], cfg, lambda qs: greedy_answers(model, tok, qs, cfg.answer_tokens))
    info = fit_alignment(model, tok, rows[:8], cfg)  # one batch, seen 25 times: its loss must fall
    assert info["steps"] == 25 and info["rows"] == 8 and info["last_loss"] < 0.5 * info["first_loss"]
    assert not any(p.requires_grad for p in model.parameters())
    out = save_alignment(model, cfg, tmp_path / "lora")
    ids = torch.tensor([tok(rows[0].prompt)["input_ids"]])
    aligned = model(ids).logits
    assert not torch.allclose(aligned, base(ids).logits)
    loaded = PeftModel.from_pretrained(base, str(out))
    assert torch.allclose(loaded(input_ids=ids).logits, aligned, atol=1e-5)
    remove_lora(model)
    assert not lora_layers(model)


def test_alignment_checkpoints_and_resumes(tiny_testbed, tmp_path):
    from memoe.training import TrainerOptions

    tb = tiny_testbed
    rows = [AlignRow(r.request.text, r.request.target_new, "in-scope") for r in tb.dataset.records[:12]]
    opts = TrainerOptions(checkpoint_dir=str(tmp_path / "ckpt"))
    assert fit_alignment(tb.model, tb.tokenizer, rows, AlignConfig(max_steps=3, batch_size=4), opts)["steps"] == 3
    assert (tmp_path / "ckpt" / "last.json").is_file() and (tmp_path / "ckpt" / "last.safetensors").is_file()
    saved = {k: v.clone() for k, v in lora_tensors(tb.model).items()}
    remove_lora(tb.model)
    resumed = fit_alignment(tb.model, tb.tokenizer, rows, AlignConfig(max_steps=5, batch_size=4),
                            TrainerOptions(checkpoint_dir=str(tmp_path / "ckpt"), resume="last"))
    assert resumed["steps"] == 5 and not all(torch.equal(saved[k], v) for k, v in lora_tensors(tb.model).items())
    remove_lora(tb.model)
