"""Known-fact selection on a model whose probabilities are set by hand."""

import pytest

from memoe.data import EditDataset, EditRecord, EditRequest
from memoe.evaluation.known import known, select_known
from memoe.experiment import known_records

from .fakes import BigramLM, word_tokenizer

WORDS = ["Ada", "Bob", "Cy", "Dee", "lives", "works", "sings", "Paris", "Rome", "Oslo", "Lima", "in"]


@pytest.fixture
def lm():
    tok = word_tokenizer(WORDS)
    m = BigramLM(tok)
    m.set("lives", {"Rome": 0.5, "Paris": 0.2})    # true Rome, greedy Rome: known by both rules
    m.set("works", {"Oslo": 0.4, "Lima": 0.3})     # true Lima > new Paris, but greedy is Oslo: prefers_true only
    m.set("sings", {"Paris": 0.6, "Rome": 0.1})    # true Rome < new Paris: known by neither
    return m, tok


def rec(subject, verb, new, true, cid):
    return EditRecord(request=EditRequest("{} " + verb, subject, new, true, cid))


RECORDS = [rec("Ada", "lives", "Paris", "Rome", 1), rec("Bob", "works", "Paris", "Lima", 2),
           rec("Cy", "sings", "Paris", "Rome", 3), rec("Dee", "lives", "Oslo", "Rome", 4),
           EditRecord(request=EditRequest("{} lives", "Cy", "Paris", None, 5))]  # no true target: never known


def test_rules(lm):
    m, tok = lm
    reqs = [r.request for r in RECORDS]
    assert known(m, tok, reqs, "prefers_true") == [True, True, False, True, False]
    assert known(m, tok, reqs, "greedy") == [True, False, False, True, False]
    with pytest.raises(ValueError, match="unknown known-fact rule"):
        known(m, tok, reqs, "vibes")


def test_select_first_n_known_and_count_what_was_tried(lm):
    m, tok = lm
    kept, info = select_known(m, tok, RECORDS, n=2, rule="prefers_true")
    assert [r.request.case_id for r in kept] == [1, 2] and info == {"rule": "prefers_true", "tried": 2, "kept": 2}
    kept, info = select_known(m, tok, RECORDS, n=3, rule="greedy")
    assert [r.request.case_id for r in kept] == [1, 4] and info == {"rule": "greedy", "tried": 5, "kept": 2}
    kept, info = select_known(m, tok, RECORDS, rule="prefers_true")
    assert [r.request.case_id for r in kept] == [1, 2, 4] and info["tried"] == 5


def test_known_only_dataset_records_its_selection(lm):
    m, tok = lm
    ds = known_records(m, tok, EditDataset("toy", list(RECORDS), "hand-built"), n=3)
    assert [r.request.case_id for r in ds.records] == [1, 2, 4]
    assert ds.meta["selection"] == {"rule": "prefers_true", "tried": 4, "kept": 3}
