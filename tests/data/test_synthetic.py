import random

import pytest

from memoe.data import WorldConfig, build_world, check_records


def test_deterministic_under_seed():
    a = build_world(WorldConfig(num_edits=300, seed=3))
    b = build_world(WorldConfig(num_edits=300, seed=3))
    c = build_world(WorldConfig(num_edits=300, seed=4))
    assert a.dataset.records == b.dataset.records
    assert a.training_sentences(random.Random(1)) == b.training_sentences(random.Random(1))
    assert a.dataset.records != c.dataset.records


def test_records_are_valid_and_complete():
    w = build_world(WorldConfig(num_edits=600))
    recs = w.dataset.records
    kept, skipped = check_records(recs)
    assert len(kept) == 600 and not skipped
    by_subject_relation = {(f.subject, f.relation): f.obj for f in w.facts}
    for r in recs[:50]:
        assert r.request.target_new != r.request.target_true
        assert len(r.paraphrase_prompts) == 2 and r.generation_prompts and r.same_subject_prompts
        assert r.neighborhood_prompts and r.attribute_prompts
    # neighbours share the true answer: every neighbour subject's fact for this relation is target_true
    r = recs[0]
    rel = next(i for i, x in enumerate(w.relations) if x.name == r.request.relation)
    for p in r.neighborhood_prompts:
        subj = next(s for s in w.subjects if s in p and s != r.request.subject)
        assert by_subject_relation[(subj, rel)] == r.request.target_true


def test_heldout_phrasing_never_in_training_text_for_that_fact():
    w = build_world(WorldConfig(num_edits=200))
    text = "\n".join(w.training_sentences(random.Random(0), prefix_prob=0.0))
    for p in w.heldout_prompts():
        assert p.prompt + " " + p.target not in text
    for f in w.facts[:20]:  # ...while the trained phrasings are there
        k = w.trained_templates(f)[0]
        assert w.template(f, k).replace("{}", f.subject) + " " + f.obj in text


def test_order_sensitive_names_and_four_plus_phrasings():
    w = build_world(WorldConfig(num_edits=6000))
    assert all(len(r.templates) >= 4 for r in w.relations)
    names = set(w.subjects)
    assert any(" ".join(reversed(s.split())) in names for s in names)  # "A B" and "B A" both exist


def test_scales_to_100k():
    w = build_world(WorldConfig(num_edits=100_000))
    assert len(w.facts) == 100_000
    assert w.record(99_999).case_id == 99_999


def test_bad_world_config():
    with pytest.raises(ValueError, match="num_edits"):
        WorldConfig(num_edits=0)
    with pytest.raises(ValueError, match="num_relations"):
        WorldConfig(num_relations=99)
