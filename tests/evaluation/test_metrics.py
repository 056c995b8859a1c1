import math

import pytest
import torch

from memoe.data import EditRecord, EditRequest, LabeledPrompt
from memoe.evaluation.metrics import ScoreOptions, compute_metrics, harmonic_mean, ngram_entropy, raw_scores
from memoe.evaluation.scoring import score_pairs

from .fakes import BigramLM, word_tokenizer

WORDS = ["Ada", "Bob", "home", "house", "dwelling", "abode", "Paris", "Rome", "New", "York", "q", "answer", "x"]


@pytest.fixture
def lm():
    tok = word_tokenizer(WORDS)
    m = BigramLM(tok)
    m.set("home", {"Paris": 0.6, "Rome": 0.3})      # request: P(new) > P(true)
    m.set("house", {"Paris": 0.2, "Rome": 0.5})     # paraphrase 1: fails
    m.set("abode", {"Paris": 0.5, "Rome": 0.1})     # paraphrase 2: succeeds
    m.set("dwelling", {"Rome": 0.7, "Paris": 0.1})  # neighbour: keeps the true answer
    m.set("q", {"answer": 0.9})
    return m, tok


def record(**kw):
    base = dict(request=EditRequest("{} home", "Ada", "Paris", "Rome", 0),
                paraphrase_prompts=("Ada house", "Ada abode"), neighborhood_prompts=("Bob dwelling",))
    base.update(kw)
    return EditRecord(**base)


def test_scores_match_the_probabilities_set(lm):
    m, tok = lm
    s = score_pairs(m, tok, ["Ada home", "Ada home"], ["Paris", "Rome"])
    assert [math.exp(-x) for x in s.nll] == pytest.approx([0.6, 0.3], rel=1e-5)
    assert s.token_acc == [1.0, 0.0] and s.exact == [True, False]


def test_multi_token_target_uses_mean_token_nll(lm):
    m, tok = lm
    m.set("home", {"New": 0.4, "Paris": 0.3})
    m.set("New", {"York": 0.9})
    s = score_pairs(m, tok, ["Ada home"], ["New York"])
    assert math.exp(-s.nll[0]) == pytest.approx(math.sqrt(0.4 * 0.9), rel=1e-5)
    assert s.token_acc == [1.0] and s.first_prob[0] == pytest.approx(0.4, rel=1e-5)


def test_counterfact_metrics_by_hand(lm):
    m, tok = lm
    mt = compute_metrics(raw_scores(m, tok, [record()]))
    assert mt["cf_efficacy"] == 1.0 and mt["cf_efficacy_mag"] == pytest.approx(0.3, abs=1e-5)
    assert mt["cf_paraphrase"] == 0.5  # one of two paraphrases
    assert mt["cf_paraphrase_mag"] == pytest.approx(((0.2 - 0.5) + (0.5 - 0.1)) / 2, abs=1e-5)
    assert mt["cf_neighbourhood"] == 1.0 and mt["cf_neighbourhood_mag"] == pytest.approx(0.6, abs=1e-5)
    assert mt["cf_score"] == pytest.approx(harmonic_mean([1.0, 0.5, 1.0]))
    assert mt["locality"] is None  # needs the pre-edit scores


def test_per_record_averaging(lm):
    """The paraphrase score averages per record first (ROME), not over all prompts pooled."""
    m, tok = lm
    recs = [record(), record(request=EditRequest("{} home", "Bob", "Paris", "Rome", 1), paraphrase_prompts=("Bob abode",))]
    mt = compute_metrics(raw_scores(m, tok, recs))
    assert mt["cf_paraphrase"] == pytest.approx((0.5 + 1.0) / 2)  # pooled would be 2/3


def test_zsre_and_easyedit_metrics_by_hand(lm):
    m, tok = lm
    rec = record(locality_prompts=(LabeledPrompt("q", "answer"),))
    pre = raw_scores(m, tok, [rec])
    m.set("q", {"x": 0.8})  # the edit broke the unrelated fact
    post = raw_scores(m, tok, [rec])
    mt = compute_metrics(post, pre)
    assert mt["zsre_efficacy"] == mt["reliability"] == 1.0
    assert mt["zsre_paraphrase"] == mt["generality"] == 0.5
    assert mt["zsre_specificity"] == 0.0
    assert mt["locality"] == 0.0  # argmax moved from "answer" to "x"
    assert compute_metrics(pre, pre)["locality"] == 1.0


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0]) == 0.0


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((h2 * 2 / 3 + 1.0 * 4 / 3) / 2)
    assert ngram_entropy("the the the the") == 0.0


# -- generation metrics, stress sets, perplexity --------------------------------------------------------------

def _raw(answers=None, **kw):
    from memoe.evaluation.metrics import RawScores
    from memoe.evaluation.scoring import PairScores

    empty = PairScores([], [], [], [])
    n = len(kw.get("targets", []))
    return RawScores(kw.pop("request_new", PairScores([1.0] * n, [0.0] * n, [[0]] * n, [0.0] * n)),
                     kw.pop("request_true", PairScores([2.0] * n, [0.0] * n, [[0]] * n, [0.0] * n)),
                     [empty] * n, [empty] * n, [empty] * n, [empty] * n, [empty] * n, [empty] * n, answers=answers, **kw)


def test_generation_metrics_on_set_answers():
    pre = _raw({"request": [[" Rome"], [" Oslo"]], "para": [[" Rome", " Rome"], []], "neigh": [[" Rome.", " Lima"], [" Oslo"]],
                "loc": [[], []], "probe": [[" a cook"], [" 1901"]]}, targets=["Paris", "Lima"])
    post = _raw({"request": [[" Paris, in fact"], [" the Lima."]], "para": [[" Paris", " Rome"], []],
                 "neigh": [[" rome", " Paris"], [" Oslo. Surely"]], "loc": [[], []], "probe": [[" a cook"], [" 1902"]]},
                targets=["Paris", "Lima"])
    m = compute_metrics(post, pre)
    assert m["gen_efficacy"] == 1.0  # "Paris, in fact" and "the Lima" both begin with their target
    assert m["gen_paraphrase"] == 0.5  # record 0: one of two; record 1 has no paraphrases
    assert m["gen_neighbourhood"] == pytest.approx((0.5 + 1.0) / 2)  # "rome" = "Rome." and "Oslo. Surely" = "Oslo"; "Paris" moved
    assert m["gen_same_subject"] == 0.5 and m["gen_locality"] is None and m["gen_reliability"] is None  # no locality prompts
    assert compute_metrics(post)["gen_neighbourhood"] is None  # agreement needs the unedited model's answers


def test_generation_metrics_with_locality_prompts_use_zsres_names():
    pre = _raw({"request": [[" no"]], "para": [[" no"]], "neigh": [[]], "loc": [[" 1998", " blue"]], "probe": [[]]}, targets=["2006"])
    post = _raw({"request": [[" 2006"]], "para": [[" 2005"]], "neigh": [[]], "loc": [[" 1998", " red"]], "probe": [[]]}, targets=["2006"])
    m = compute_metrics(post, pre)
    assert (m["gen_reliability"], m["gen_generality"], m["gen_locality"]) == (1.0, 0.0, 0.5)


def test_stress_metrics_by_hand():
    from memoe.evaluation.scoring import PairScores

    ps = lambda nll: PairScores(nll, [0.0] * len(nll), [[0]] * len(nll), [0.0] * len(nll))
    pre = _raw(targets=["x", "y"], probe_next=[[5, 6], [7]], plus_new=[ps([3.0]), ps([3.0])], plus_true=[ps([1.0]), ps([1.0])],
               prefixed_new=ps([2.0, 2.0]), prefixed_true=ps([1.0, 1.0]))
    # the edit's own sentence before the neighbour flips record 0's neighbour to the new target; the prefix keeps one edit
    post = _raw(targets=["x", "y"], probe_next=[[5, 9], [7]], plus_new=[ps([0.5]), ps([3.0])], plus_true=[ps([1.0]), ps([1.0])],
                prefixed_new=ps([0.5, 2.0]), prefixed_true=ps([1.0, 1.0]))
    m = compute_metrics(post, pre)
    assert m["cf_plus_neighbourhood"] == 0.5 and m["prefixed_efficacy"] == 0.5
    assert m["same_subject_agreement"] == pytest.approx(2 / 3)  # one probe's next token moved
    assert compute_metrics(pre, pre)["cf_plus_neighbourhood"] == 1.0


def test_stress_prompts_are_built_as_defined(lm, monkeypatch):
    import memoe.evaluation.metrics as metrics
    from memoe.evaluation.metrics import PREFIX, ScoreOptions

    m, tok = lm
    seen = []
    real = metrics.score_pairs
    spy = lambda model, tok, prompts, targets, bs: seen.extend(prompts) or real(model, tok, prompts, targets, bs)
    monkeypatch.setattr(metrics, "score_pairs", spy)
    rec = record(request=EditRequest("{} home", "Ada", "Paris", "Rome", 0, relation="P1"))
    other = record(request=EditRequest("{} dwelling", "Bob", "Rome", "Paris", 1, relation="P2"))
    raw_scores(m, tok, [rec, other], ScoreOptions(fluency_prompts=0, generation=False, perplexity_texts=0))
    assert "Ada home Paris. Bob dwelling" in seen  # CounterFact+: the edit's sentence, then the neighbour
    assert f"{PREFIX} Ada home" in seen
    assert "Ada dwelling" in seen and "Bob home" in seen  # each subject under the other record's relation


def test_perplexity_equals_an_independent_computation(tiny_testbed):
    from memoe.evaluation.metrics import PERPLEXITY_TOKENS, perplexity

    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    texts = [r.request.text + " " + r.request.target_true for r in tiny_testbed.dataset.records[:5]] + ["x " * 300]
    total, count = 0.0, 0
    for t in texts:  # one text at a time, the model's own loss (mean NLL of tokens 1..T-1)
        ids = torch.tensor([tok(t)["input_ids"][:PERPLEXITY_TOKENS]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.double().item()
        total, count = total + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    assert perplexity(model, tok, texts, batch_size=4) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_subject_probes_use_other_relations_of_the_run():
    from memoe.evaluation.metrics import subject_probes

    recs = [record(request=EditRequest("{} lives in", "Ada", "Paris", "Rome", 1, relation="P1")),
            record(request=EditRequest("{} works for", "Bob", "IBM", "BBC", 2, relation="P2")),
            record(request=EditRequest("{} was born in", "Cy", "Oslo", "Lima", 3, relation="P3")),
            record(request=EditRequest("{} resides in", "Dee", "Oslo", "Lima", 4, relation="P1")),
            record(request=EditRequest("{} x", "Eve", "a", "b", 5), same_subject_prompts=(LabeledPrompt("Eve q", "answer"),))]
    prompts = lambda probes, k: tuple(p for p, _ in probes[k])
    probes = subject_probes(recs, per_record=2)
    assert prompts(probes, 1) == ("Ada works for", "Ada was born in") and prompts(probes, 4) == ("Dee works for", "Dee was born in")
    assert prompts(probes, 2) == ("Bob lives in", "Bob was born in")
    assert probes[5] == (("Eve q", "answer"),)  # the world's own, with its answer, where it has them


def test_subject_probes_leave_out_facts_the_run_also_edits():
    from memoe.evaluation.metrics import subject_probes

    # Ada's home and employer are both edited in the run: after it, each must give its new answer, so neither is a
    # probe of the other's locality.
    recs = [record(request=EditRequest("{} lives in", "Ada", "Paris", "Rome", 1, relation="P1")),
            record(request=EditRequest("{} works for", "Ada", "IBM", "BBC", 2, relation="P2")),
            record(request=EditRequest("{} was born in", "Cy", "Oslo", "Lima", 3, relation="P3")),
            record(request=EditRequest("{} x", "Eve", "a", "b", 4),
                   same_subject_prompts=(LabeledPrompt("Eve y", "c"), LabeledPrompt("Eve z", "d"))),
            record(request=EditRequest("{} y", "Eve", "e", "c", 5))]
    probes = subject_probes(recs, per_record=3)
    assert [p for p, _ in probes[1]] == ["Ada was born in"] and [p for p, _ in probes[2]] == ["Ada was born in"]
    assert [p for p, _ in probes[3]] == ["Cy lives in", "Cy works for"]
    assert probes[4] == (("Eve z", "d"),)  # "Eve y" is record 5's request


def test_shared_subject_batch_scores_only_edits_whose_subject_shares_their_batch():
    from memoe.evaluation.metrics import shared_subject_batch
    from memoe.evaluation.scoring import PairScores

    subjects = ["Ada", "Bob", "Ada", "Cy", "Cy", "Bob"]
    recs = [record(request=EditRequest("{} home", s, "Paris", "Rome", i)) for i, s in enumerate(subjects)]
    won = [True, True, False, True, True, False]  # P(new) > P(true) per edit
    rs = _raw(targets=["Paris"] * 6, request_new=PairScores([1.0 if w else 3.0 for w in won], [0.0] * 6, [[0]] * 6, [0.0] * 6))
    # batches [0, 1, 2] and [3, 4, 5]: Ada twice in the first (one of two won), Cy twice in the second (both won)
    assert shared_subject_batch(rs, recs, [range(0, 3), range(3, 6)]) == 0.75
    assert shared_subject_batch(rs, recs, [range(i, i + 1) for i in range(6)]) is None  # single edits share nothing


def test_table_cells_show_three_decimals_and_huge_values_in_scientific_notation():
    from memoe.evaluation.metrics import fmt_metric

    assert (fmt_metric(None), fmt_metric(0.5), fmt_metric(-0.0625), fmt_metric(7.1e43)) == ("–", "0.500", "-0.062", "7.10e+43")


def test_neighbours_that_the_run_edits_are_left_out_of_every_neighbourhood_score(lm):
    from memoe.evaluation.metrics import edited_neighbours

    # Bob is Ada's neighbour (same relation) and is edited in the same run: after it "Bob home" must give Bob's new
    # answer, so it is no neighbour of Ada's edit. "New home" names no edited subject; x's edit is of another relation.
    recs = [record(request=EditRequest("{} home", "Ada", "Paris", "Rome", 1, relation="P1"),
                   neighborhood_prompts=("Bob home", "New home", "x home")),
            record(request=EditRequest("{} house", "Bob", "Paris", "Rome", 2, relation="P1"), neighborhood_prompts=("Ada house",)),
            record(request=EditRequest("{} dwelling", "x", "Paris", "Rome", 3, relation="P2"), neighborhood_prompts=())]
    assert edited_neighbours(recs) == {(1, "Bob home"), (2, "Ada house")}
    m, tok = lm
    rs = raw_scores(m, tok, recs, ScoreOptions(fluency_prompts=0, generation=False, perplexity_texts=0, stress=True))
    assert [len(g.nll) for g in rs.neigh_new] == [2, 0, 0] and [len(g.nll) for g in rs.loc] == [2, 0, 0]
    assert [len(g.nll) for g in rs.plus_new] == [2, 0, 0]
    alone = raw_scores(m, tok, recs[:1], ScoreOptions(fluency_prompts=0, generation=False, perplexity_texts=0, stress=False))
    assert len(alone.neigh_new[0].nll) == 3  # alone, Ada's edit has all three neighbours
    # a record's own subject is no other edited fact; and one record's edited neighbour is not dropped from another's
    own = [record(request=EditRequest("{} home", "Ada", "a", "b", 1, relation="P1"), neighborhood_prompts=("Ada home", "Bob home")),
           record(request=EditRequest("{} home", "Bob", "a", "b", 2, relation="P1"), neighborhood_prompts=("Bob home",))]
    assert edited_neighbours(own) == {(1, "Bob home")}
    # whole names only: "Bobby" is not Bob
    assert edited_neighbours([record(request=EditRequest("{} home", "Ada", "a", "b", 1, relation="P1"), neighborhood_prompts=("Bobby home",)),
                              record(request=EditRequest("{} home", "Bob", "a", "b", 2, relation="P1"), neighborhood_prompts=())]) == frozenset()
