"""Generation-based metrics: the answer protocol on hand-built strings, greedy answers of a model whose greedy output is
set, and batched decoding against a plain one-prompt-at-a-time reference on a real (tiny) Llama."""

import pytest
import torch

from memoe.evaluation.generation import answer, greedy_answers, hits, normalise, same_answer

from ..markers import needs_shared_data
from .fakes import BigramLM, word_tokenizer


@pytest.mark.parametrize("text, expected", [("The Eiffel Tower.", "eiffel tower"), ("  an  Apple, of course ", "apple of course"),
                                            ("Théâtre du Châtelet", "théâtre du châtelet"), ("A", "")])
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_answers_stop_at_a_full_stop_or_a_newline_and_hit_by_prefix():
    assert answer(" Paris. It is the capital") == " Paris" and answer(" Rome\nand more") == " Rome" and answer(" x") == " x"
    assert hits(" the English language, mostly.", "English") and hits(" English", "english.")
    assert not hits(" French. English", "English")  # after the stop: not the answer
    assert not hits(" Eng", "English") and not hits(" anything", "") and not hits(" anything", "the")  # empty targets never hit
    assert same_answer(" Paris. More", "paris!") and not same_answer(" Paris", " Rome")


def test_greedy_answers_of_a_model_whose_greedy_output_is_set():
    tok = word_tokenizer(["Ada", "lives", "in", "Paris", "Rome", "near", "sea"])
    m = BigramLM(tok)
    m.set("lives", {"in": 0.9})
    m.set("in", {"Paris": 0.8})
    m.set("Paris", {"</s>": 0.9})  # end of sequence: the answer is complete
    m.set("Ada", {"near": 0.9})
    m.set("near", {"sea": 0.9})
    m.set("sea", {"</s>": 0.9})
    got = greedy_answers(m, tok, ["Ada lives", "Ada", "Ada lives in"], max_new_tokens=5, batch_size=2)
    assert got == ["in Paris", "near sea", "Paris"]
    assert hits(got[0], "in Paris") and not hits(got[1], "Paris")


def test_batched_answers_equal_one_prompt_at_a_time(tiny_testbed):
    """Left padding, length-sorted batches and the stop criterion change no answer: the reference decodes each prompt
    alone (no padding) with plain ``model.generate`` and cuts at the first stop."""
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    prompts = [r.request.text for r in tiny_testbed.dataset.records[:6]] + list(tiny_testbed.dataset.records[0].paraphrase_prompts)
    rows = []  # the batch size of every forward: rows leave a batch once their answer is complete
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        batched = greedy_answers(model, tok, prompts, max_new_tokens=12, batch_size=4)
    finally:
        hook.remove()
    assert rows[0] == 4 and 0 < min(rows) < 4
    ref = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        ref.append(answer(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    assert batched == ref
    assert any(a.strip() for a in ref)  # the testbed answers something


@pytest.mark.slow
@needs_shared_data
def test_batched_answers_equal_one_prompt_at_a_time_on_smollm2():
    """The same check on a real pretrained model (the smollm2-135m preset), whose answers are sentences."""
    from memoe.data import load_edit_dataset
    from memoe.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    recs = load_edit_dataset("counterfact", limit=3).records
    prompts = [p for r in recs for p in (r.request.text, *r.paraphrase_prompts[:1], *r.neighborhood_prompts[:1])]
    batched = greedy_answers(model, tok, prompts, max_new_tokens=20, batch_size=4)
    ref = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        ref.append(answer(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
    assert batched == ref and sum(bool(a.strip()) for a in ref) >= len(ref) - 1
