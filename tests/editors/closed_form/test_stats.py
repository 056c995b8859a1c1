import pytest
import torch

from memoe import nethook
from memoe.editors.closed_form import stats
from memoe.editors.closed_form.stats import layer_stats, layers_stats, second_moment, second_moments
from memoe.models import model_parts


def test_second_moment_equals_direct_computation_and_ignores_padding(tiny_testbed):
    tb = tiny_testbed
    texts = ["Kalo Mira was born in Paris.", "Short.", "The birthplace of someone is somewhere far away."]
    C, n = second_moment(tb.model, tb.tokenizer, texts, layer=1, samples=10_000, batch_size=2, progress=False)
    name = model_parts(tb.model).name("down_proj", 1)
    ks = []
    for t in texts:  # one text at a time: no padding at all
        ids = torch.tensor([tb.tokenizer(t)["input_ids"]])
        with nethook.capture(tb.model, [name], inputs=True) as store:
            tb.model(ids)
        ks.append(store[name][0].double())
    K = torch.cat(ks)
    assert n == K.shape[0]
    assert torch.allclose(C, K.T @ K / n, rtol=1e-4, atol=1e-7)  # activations are float32
    assert C.dtype == torch.float64


def test_sample_cap(tiny_testbed):
    C, n = second_moment(tiny_testbed.model, tiny_testbed.tokenizer, ["a b c d e f"] * 10, layer=0, samples=13, progress=False)
    assert n == 13


def test_several_layers_in_one_pass_are_each_layers_own(tiny_testbed, tmp_path, monkeypatch):
    """MEMIT's edit layers read in one pass over the corpus (stopping at the highest) give each layer's C0, cached
    per layer; a later call finds them all in the cache."""
    tb = tiny_testbed
    texts = ["Kalo Mira was born in Paris.", "Short.", "The birthplace of someone is somewhere far away."] * 4
    together, n = second_moments(tb.model, tb.tokenizer, texts, [0, 2], samples=60, batch_size=5, progress=False)
    for layer in (0, 2):
        alone, m = second_moment(tb.model, tb.tokenizer, texts, layer, samples=60, batch_size=5, progress=False)
        assert n == m == 60 and torch.allclose(together[layer], alone, rtol=1e-12, atol=1e-15)
    C = layers_stats(tb.model, tb.tokenizer, [2, 0], samples=300, cache_dir=tmp_path, progress=False)
    assert sorted(C) == [0, 2] and len(list((tmp_path / "stats").rglob("*.safetensors"))) == 2
    monkeypatch.setattr(stats, "second_moments", lambda *a, **k: pytest.fail("recomputed a cached layer"))
    assert torch.equal(layer_stats(tb.model, tb.tokenizer, 2, samples=300, cache_dir=tmp_path, progress=False), C[2])


def test_stats_cache_is_validated(tiny_testbed, tmp_path):
    tb = tiny_testbed
    C1 = layer_stats(tb.model, tb.tokenizer, 0, samples=500, cache_dir=tmp_path, progress=False)
    files = list((tmp_path / "stats").rglob("*.safetensors"))
    assert len(files) == 1
    assert torch.equal(layer_stats(tb.model, tb.tokenizer, 0, samples=500, cache_dir=tmp_path, progress=False), C1)
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable"):
        C2 = layer_stats(tb.model, tb.tokenizer, 0, samples=500, cache_dir=tmp_path, progress=False)
    assert torch.equal(C1, C2)
    # a different layer or sample count is a different entry, never a reuse
    C3 = layer_stats(tb.model, tb.tokenizer, 1, samples=500, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "stats").rglob("*.safetensors"))) == 2 and not torch.equal(C1, C3)


def test_statistics_pass_stops_at_the_layer_it_reads(tiny_testbed):
    """The forward is cut after the down-projection read: no layer above it runs."""
    tb = tiny_testbed
    parts = model_parts(tb.model)
    ran = []
    handle = parts.layer(parts.num_layers - 1).register_forward_hook(lambda *a: ran.append(1))
    try:
        second_moment(tb.model, tb.tokenizer, ["a b c d e f"] * 4, layer=0, samples=100, progress=False)
        assert ran == []
        with torch.no_grad():
            tb.model(torch.tensor([[1, 2, 3]]))
        assert ran == [1]  # the hook itself works, and nothing was left behind by the cut-short pass
    finally:
        handle.remove()


def test_auto_corpus(tiny_testbed, tmp_path, monkeypatch):
    """``auto`` is a testbed's own corpus.txt, else the Wikipedia sample gensim ships, else self-generated text."""
    import importlib.util

    from memoe.editors.closed_form import stats
    from memoe.editors.closed_form.stats import corpus_texts, resolve_corpus

    assert resolve_corpus("auto", tiny_testbed.model) == str(tiny_testbed.path / "corpus.txt")

    class M:
        name_or_path = str(tmp_path)

    assert resolve_corpus("auto", M()) == "wikipedia"  # gensim is installed by `make install`
    real = importlib.util.find_spec
    monkeypatch.setattr(stats.importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.warns(UserWarning, match="gensim"):
        assert resolve_corpus("auto", M()) == "self"
    assert resolve_corpus("x.txt", M()) == "x.txt"
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert list(corpus_texts(str(tmp_path / "t.txt"))) == ["one", "two"]


def test_wikipedia_sample_is_clean_prose(tmp_path, monkeypatch):
    from memoe.editors.closed_form.stats import wikipedia_paragraphs

    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path))
    paras = wikipedia_paragraphs()
    assert len(paras) > 3000 and sum(len(p.split()) for p in paras) > 300_000
    assert not any(("\'\'" in p) or p.startswith("=") or ("[[" in p) or ("\n" in p) for p in paras)
    assert any(p.startswith("Anarchism is a political philosophy") for p in paras)
    assert list(tmp_path.glob("corpora/wikipedia-gensim-*.txt"))  # cached for the next call
    assert wikipedia_paragraphs() == paras


def test_self_generated_corpus_is_deterministic(tiny_testbed):
    from memoe.editors.closed_form.stats import self_generated_texts

    tb = tiny_testbed
    a = self_generated_texts(tb.model, tb.tokenizer, n=3, length=12, seed=0)
    assert a == self_generated_texts(tb.model, tb.tokenizer, n=3, length=12, seed=0)
    assert a != self_generated_texts(tb.model, tb.tokenizer, n=3, length=12, seed=1)
    assert len(a) == 3 and all(len(tb.tokenizer(t, add_special_tokens=False)["input_ids"]) >= 8 for t in a)


def test_stats_cache_with_a_changed_value_is_recomputed(tiny_testbed, tmp_path):
    """A C0 file that still loads, symmetric and finite, but holds other numbers, is caught by its content hash."""
    from safetensors import safe_open

    from memoe.io import load_tensors, save_tensors

    tb = tiny_testbed
    C1 = layer_stats(tb.model, tb.tokenizer, 0, samples=500, cache_dir=tmp_path, progress=False)
    (f,) = list((tmp_path / "stats").rglob("*.safetensors"))
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    save_tensors(f, {"C0": load_tensors(f)["C0"] * 1.5}, metadata=meta)
    with pytest.warns(UserWarning, match="content hash"):
        C2 = layer_stats(tb.model, tb.tokenizer, 0, samples=500, cache_dir=tmp_path, progress=False)
    assert torch.equal(C1, C2)


def test_stats_corpus_file_is_keyed_by_its_content(tiny_testbed, tmp_path):
    """A cut or edited corpus file is a different corpus: its C0 is computed again, not read from the cache."""
    tb = tiny_testbed
    corpus = tmp_path / "c.txt"
    corpus.write_text("Kalo Mira was born in Paris.\nThe river is long and wide.\n")
    C1 = layer_stats(tb.model, tb.tokenizer, 0, corpus=str(corpus), samples=500, cache_dir=tmp_path, progress=False)
    corpus.write_text("Kalo Mira was born in Paris.\n")
    C2 = layer_stats(tb.model, tb.tokenizer, 0, corpus=str(corpus), samples=500, cache_dir=tmp_path, progress=False)
    assert not torch.equal(C1, C2) and len(list((tmp_path / "stats").rglob("*.safetensors"))) == 2
