import math

import pytest

from memoe.data import EditRecord, EditRequest, LabeledPrompt
from memoe.evaluation.metrics import compute_metrics, harmonic_mean, ngram_entropy, raw_scores
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
