"""Context prefixes: fixed and model-generated, made once per model, used by every editor's rows."""

import torch

from memoe.contexts import ContextOptions, PrefixMemo, generate_prefixes, prefixed


def test_prefixed_keeps_the_bare_prompt_first():
    assert prefixed("{} plays", ["A.", "B."]) == ["{} plays", "A. {} plays", "B. {} plays"]


def test_generated_prefixes_are_seeded_sentences(tiny_testbed):
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    a = generate_prefixes(model, tok, 7, 6, seed=0)
    assert a == generate_prefixes(model, tok, 7, 6, seed=0)  # deterministic under the seed
    assert a != generate_prefixes(model, tok, 7, 6, seed=1)
    assert len(a) == 7
    assert all(p.endswith((".", "!", "?")) and "{" not in p and "}" not in p for p in a)
    # 7 over the 5 seed words: two each from the first two, one from the rest
    seeds = ["The", "The", "Therefore", "Therefore", "Because", "I", "You"]
    assert all(p.startswith(s) for p, s in zip(a, seeds))
    assert all(len(tok(p, add_special_tokens=False)["input_ids"]) >= 6 for p in a)


def test_memo_generates_once_per_model_and_keeps_fixed_prefixes_first(tiny_testbed):
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    opts = ContextOptions(context_prefixes=["It rained."], generated_prefixes=3, generated_prefix_tokens=4)
    memo = PrefixMemo()
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = memo.resolve(model, tok, opts)
        n_calls = len(calls)
        assert memo.resolve(model, tok, opts) == first and len(calls) == n_calls  # reused, not regenerated
    finally:
        handle.remove()
    assert n_calls == 3 * 4  # 3 prefixes from 3 seed words, one forward per generated token each
    assert first[0] == "It rained." and len(first) == 4
    resolved = memo.apply(model, tok, opts)
    assert resolved.context_prefixes == first and resolved.generated_prefixes == 0 and opts.generated_prefixes == 3
    assert memo.resolve(model, tok, ContextOptions(context_prefixes=[])) == []  # nothing generated when not asked


def test_closed_form_editor_uses_generated_prefixes(tiny_testbed, tmp_path):
    from memoe.editors import make_editor

    tb = tiny_testbed
    reqs = [r.request for r in tb.dataset.records[:2]]
    common = {"stats_samples": 2000, "v_steps": 5, "stats_cache": str(tmp_path), "layers": [0]}
    plain = make_editor("memit", overrides={**common, "context_prefixes": []})
    gen = make_editor("memit", overrides={**common, "context_prefixes": [], "generated_prefixes": 2})
    d_plain, _ = plain.compute_deltas(tb.model, tb.tokenizer, reqs)
    d_gen, _ = gen.compute_deltas(tb.model, tb.tokenizer, reqs)
    assert len(gen.prefixes.resolve(tb.model, tb.tokenizer, gen.config)) == 2
    name = next(iter(d_plain))
    assert not torch.allclose(d_plain[name], d_gen[name])  # the keys/targets were averaged over the new rows
