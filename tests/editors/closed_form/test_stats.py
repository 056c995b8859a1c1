import pytest
import torch

from memoe.editors.closed_form.stats import layer_stats, second_moment
from memoe.models import model_parts
from memoe import nethook


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


def test_auto_corpus_needs_a_testbed(tmp_path):
    from memoe.editors.closed_form.stats import corpus_texts

    class M:
        name_or_path = str(tmp_path)

    with pytest.raises(FileNotFoundError, match="stats_corpus"):
        next(corpus_texts("auto", M()))
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert list(corpus_texts(str(tmp_path / "t.txt"))) == ["one", "two"]
