import pytest
import torch
from transformers import LlamaForCausalLM

from memoe import nethook
from memoe.models import llama3_mini_config, model_parts
from memoe.tokens import fact_position, subject_span
from memoe.trace import _window, causal_trace, trace_fact
from tests.evaluation.fakes import word_tokenizer

WORDS = ["alice", "bob", "lives", "in", "paris", "rome", "oslo", "lima", "cairo", "the"]
TEMPLATE, SUBJECT, TARGET = "{} lives in the", "alice bob", "paris"


def random_llama(tok, seed: int = 0, only_attention_at: int | None = None, layers: int = 4):
    """A random Llama-3-shaped model; with ``only_attention_at=a`` every other layer's attention output is zero,
    so the subject reaches the last token through layer a's attention and nowhere else."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama3_mini_config(vocab_size=len(tok), hidden_size=64, layers=layers)).eval()
    if only_attention_at is not None:
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                if i != only_attention_at:
                    layer.self_attn.o_proj.weight.zero_()
                else:
                    layer.self_attn.o_proj.weight.mul_(20.0)  # a strong route: the answer moves visibly
            model.lm_head.weight.mul_(20.0)
    return model


def test_subject_span(tiny_testbed):
    tok = tiny_testbed.tokenizer
    tpl, subj = "The birthplace of {} is", tiny_testbed.world.subjects[0]
    s, e = subject_span(tok, tpl, subj)
    ids = tok(tpl.replace("{}", subj))["input_ids"]
    assert tok.decode(ids[s:e]).strip() == subj
    assert fact_position(tok, tpl, subj, "prompt_last") == len(ids) - 1
    assert fact_position(tok, "{} was born in", subj, "subject_first") == 1  # right after BOS
    with pytest.raises(ValueError, match="exactly one"):
        subject_span(tok, "no slot", subj)


def test_trace_finds_the_one_state_that_carries_the_answer():
    """Attention only at layer 2: the subject reaches the last token there and nowhere else. Restoring the
    attention output of layer 2 at the last token gives the clean probability back exactly, every other
    attention restoration nothing; the last token's hidden state carries the answer from layer 2 on and not
    before; the subject's hidden states carry nothing once layer 2 has read them; the tokens after the subject
    never do."""
    tok = word_tokenizer(WORDS)
    model = random_llama(tok, only_attention_at=2)
    with torch.no_grad():  # the answer: the clean model's likeliest word, so there is probability to lose
        logits = model(torch.tensor([tok(TEMPLATE.replace("{}", SUBJECT))["input_ids"]])).logits[0, -1]
    ids = tok.convert_tokens_to_ids(WORDS)
    target = WORDS[int(logits[ids].argmax())]
    g = torch.Generator().manual_seed(0)
    f = trace_fact(model, tok, TEMPLATE, SUBJECT, target, noise_std=5.0, samples=2, generator=g, window=1)
    s0, s1 = f.subject_span
    T = len(f.tokens)
    assert (s0, s1, T) == (1, 3, 6)
    assert abs(f.p_clean - f.p_corrupt) > 0.01
    last, after = T - 1 - s0, s1 - s0  # row indices: tokens counted from the subject's first
    for layer in range(4):
        for t in range(T - s0):
            expected = f.p_clean if (t == last and layer == 2) else f.p_corrupt
            assert f.restored["attn"][t][layer] == pytest.approx(expected, abs=1e-6), (t, layer)
        assert f.restored["hidden"][last][layer] == pytest.approx(f.p_clean if layer >= 2 else f.p_corrupt, abs=1e-6)
        assert f.restored["hidden"][after][layer] == pytest.approx(f.p_corrupt, abs=1e-6)
        if layer >= 2:
            assert f.restored["hidden"][0][layer] == pytest.approx(f.p_corrupt, abs=1e-6)
    res = causal_trace(model, tok, [(TEMPLATE, SUBJECT, target)], samples=2, progress=False, window=1)
    assert res.peak("attn") == {"kind": "attn", "position": "prompt_last", "layer": 2,
                                "effect": pytest.approx(res.p_clean - res.p_corrupt, abs=1e-6)}


def _reference(model, tok, noise, kind, t, layer, window):
    """One restoration the plain way: a whole forward per (kind, token, layer), noise added to the embeddings."""
    parts = model_parts(model)
    L = parts.num_layers
    ids = torch.tensor([tok(TEMPLATE.replace("{}", SUBJECT))["input_ids"]])
    s0, s1 = subject_span(tok, TEMPLATE, SUBJECT)
    answer = tok(" " + TARGET, add_special_tokens=False)["input_ids"][0]
    names = [f"model.layers.{i}" for i in range(L)] + [parts.name("mlp", i) for i in range(L)] + [parts.name("attn", i) for i in range(L)]
    with torch.no_grad(), nethook.capture(model, names) as clean:
        model(ids)
    mods = [f"model.layers.{layer}"] if kind == "hidden" else [parts.name(kind, i) for i in _window(layer, window, L)]

    def put_back(name):
        def fn(h):
            h = h.clone()
            h[:, t] = clean[name][0, t]
            return h
        return fn

    def corrupt(module, args, out):
        out = out.clone()
        out[:, s0:s1] += noise
        return out

    with torch.no_grad(), nethook.hooks(model, forward={"model.embed_tokens": corrupt}), \
            nethook.patch(model, {n: put_back(n) for n in mods}):
        return torch.softmax(model(ids.repeat(len(noise), 1)).logits[:, -1], -1)[:, answer].mean().item()


def test_batched_trace_equals_one_restoration_at_a_time():
    """Rows joining at their first differing layer and computing only the tokens from the restored one on give
    what a whole forward per restoration gives, for every kind and a 3-layer window."""
    tok = word_tokenizer(WORDS)
    model = random_llama(tok, seed=1, layers=5)
    f = trace_fact(model, tok, TEMPLATE, SUBJECT, TARGET, noise_std=3.0, samples=2, generator=torch.Generator().manual_seed(7),
                   window=3, max_rows=7)  # small chunks: the chunking is exercised too
    noise = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(7)) * 3.0
    s0 = f.subject_span[0]
    for kind in ("hidden", "mlp", "attn"):
        for t in range(s0, len(f.tokens)):
            for layer in range(5):
                ref = _reference(model, tok, noise, kind, t, layer, window=3)
                assert f.restored[kind][t - s0][layer] == pytest.approx(ref, abs=1e-5), (kind, t, layer)


def test_zero_noise_restores_nothing(tiny_testbed):
    model, tok = tiny_testbed.model, tiny_testbed.tokenizer
    r = tiny_testbed.dataset[0].request
    f = trace_fact(model, tok, r.prompt, r.subject, r.target_true, noise_std=0.0, samples=2)
    assert f.p_corrupt == pytest.approx(f.p_clean, abs=1e-6)
    assert all(v == pytest.approx(f.p_clean, abs=1e-5) for rows in f.restored.values() for row in rows for v in row)


def test_causal_trace_average_and_plot(tiny_testbed, tmp_path):
    from memoe.trace import plot_trace

    facts = [(r.request.prompt, r.request.subject, r.request.target_true) for r in tiny_testbed.dataset.records[:4]]
    res = causal_trace(tiny_testbed.model, tiny_testbed.tokenizer, facts, samples=2, progress=False)
    assert res.n_facts == 4 and res.p_clean > res.p_corrupt
    assert res.effects["hidden"]["prompt_last"][-1] == pytest.approx(res.p_clean - res.p_corrupt, abs=1e-5)
    assert set(res.peak("mlp")) == {"kind", "position", "layer", "effect"}
    d = res.to_dict()
    assert len(d["facts"]) == 4 and d["settings"]["window"] == 10 and set(d["effects"]) == {"hidden", "mlp", "attn"}
    plot_trace(res, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
