import torch

from memoe.adapters.anchors import AnchorTrie, EntityDetector, anchor_positions


def ids(tok, text):
    return tok(text, add_special_tokens=True)["input_ids"]


def span_text(tok, row, span):
    return tok.decode(row[span[0] : span[1]]).strip()


def test_trie_finds_multi_token_subjects_in_both_spellings(tiny_testbed):
    tok = tiny_testbed.tokenizer
    subject = tiny_testbed.dataset.records[0].request.subject
    trie = AnchorTrie.for_tokenizer(tok)
    trie.add(tok, subject)
    assert all(len(s) >= 2 for s in trie.sequences), "the test needs a multi-token subject"
    for text in (f"{subject} lives in", f"It rained all day. {subject} lives in"):
        row = ids(tok, text)
        (span,) = trie.find(row)
        assert span_text(tok, row, span) == subject


def test_trie_ignores_partial_matches(tiny_testbed):
    tok = tiny_testbed.tokenizer
    subject = tiny_testbed.dataset.records[0].request.subject
    first, second = subject.split()[:2]
    trie = AnchorTrie.for_tokenizer(tok)
    trie.add(tok, subject)
    for text in (f"{first} lives in", f"{subject}zz lives in", f"zz{subject} lives in", f"{second} {first} lives in"):
        assert trie.find(ids(tok, text)) == [], text


def test_trie_prefers_the_longest_anchor(tiny_testbed):
    tok = tiny_testbed.tokenizer
    subject = tiny_testbed.dataset.records[0].request.subject
    trie = AnchorTrie.for_tokenizer(tok)
    trie.add(tok, subject.split()[0])
    trie.add(tok, subject)
    row = ids(tok, f"The {subject} is")
    (span,) = trie.find(row)
    assert span_text(tok, row, span) == subject


def test_trie_gives_each_match_its_entity_id_in_both_spellings(tiny_testbed):
    tok = tiny_testbed.tokenizer
    a, b = (r.request.subject for r in tiny_testbed.dataset.records[:2])
    trie = AnchorTrie.for_tokenizer(tok)
    trie.add(tok, a)
    trie.add(tok, b)
    assert (trie.owner(a), trie.owner(b), trie.owner("Nobody Known")) == (0, 1, -1)
    row = ids(tok, f"{b} met {a}.")
    assert [o for _, _, o in trie.find_owned(row)] == [1, 0]
    again = AnchorTrie.for_tokenizer(tok)
    again.load_state(trie.state())  # the ids survive saving
    assert again.find_owned(row) == trie.find_owned(row)


def test_entity_detector_maps_character_spans_to_tokens(tiny_testbed):
    tok = tiny_testbed.tokenizer
    subject = tiny_testbed.dataset.records[0].request.subject

    def fake_ner(text):
        start = text.index(subject)
        return [{"start": start, "end": start + len(subject), "entity_group": "PER"}]

    row = ids(tok, f"Today {subject} lives in")
    (span,) = EntityDetector(tok, fake_ner).find(row)
    assert span_text(tok, row, span) == subject


def test_anchor_positions_are_causal():
    pos, owner = anchor_positions([[(1, 3), (5, 6)], []], 8, owners=[[7, 4], []])
    assert pos[0].tolist() == [-1, -1, 2, 2, 2, 5, 5, 5]
    assert owner[0].tolist() == [-1, -1, 7, 7, 7, 4, 4, 4]
    assert pos[1].tolist() == owner[1].tolist() == [-1] * 8
    assert pos.dtype == owner.dtype == torch.long
    assert anchor_positions([[(0, 2)]], 3)[1].tolist() == [[-1, -1, -1]]  # no ids given: unknown


def test_sentence_ends_bound_an_anchors_reach(tiny_testbed):
    pos, owner = anchor_positions([[(1, 3)], [(1, 3), (6, 7)]], 9, owners=[[0], [0, 1]], ends=[[4], [4]])
    assert pos[0].tolist() == [-1, -1, 2, 2, 2, -1, -1, -1, -1]  # the sentence end itself still belongs to it
    assert pos[1].tolist() == [-1, -1, 2, 2, 2, -1, 6, 6, 6] and owner[1].tolist() == [-1, -1, 0, 0, 0, -1, 1, 1, 1]
    tok = tiny_testbed.tokenizer
    trie = AnchorTrie.for_tokenizer(tok)
    row = ids(tok, "It rained. Then it stopped!")
    assert [tok.decode([row[i]]).strip()[-1] for i in trie.sentence_ends(row)] == [".", "!"]
