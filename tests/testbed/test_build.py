import dataclasses
import json
import re

import pytest
import torch

from memoe.testbed import TestbedConfig, build_testbed


def test_tiny_testbed_recalls_its_facts(tiny_testbed):
    rec = tiny_testbed.report["recall"]
    assert rec["requests"]["recall"] >= 0.9
    assert rec["neighbourhood"]["recall"] >= 0.9
    assert set(rec) >= {"requests", "heldout", "paraphrases", "neighbourhood"}
    for name in ("model.safetensors", "tokenizer.json", "report.json", "testbed.json", "trace.png"):
        assert (tiny_testbed.path / name).exists(), name
    assert tiny_testbed.report["storage_site"] in ("subject position", "prompt's last token")


def test_reloading_cached_testbed_gives_identical_logits(tiny_testbed, tiny_config, tiny_cache):
    again = build_testbed(tiny_config, cache_dir=tiny_cache, progress=False, verbose=False)
    assert again.path == tiny_testbed.path
    ids = torch.tensor([tiny_testbed.tokenizer(tiny_testbed.dataset[0].request.text)["input_ids"]])
    assert torch.equal(again.model(ids).logits, tiny_testbed.model(ids).logits)
    assert again.report == json.loads((tiny_testbed.path / "report.json").read_text())


MICRO = dict(dataset="synthetic", num_edits=12, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2,
             num_kv_heads=1, vocab_size=300, steps=8, batch_size=8, warmup=2, trace_facts=2)


def test_build_is_deterministic_under_seed(tmp_path):
    a = build_testbed(TestbedConfig(**MICRO), cache_dir=tmp_path / "a", progress=False, verbose=False)
    b = build_testbed(TestbedConfig(**MICRO), cache_dir=tmp_path / "b", progress=False, verbose=False)
    c = build_testbed(TestbedConfig(**{**MICRO, "seed": 1}), cache_dir=tmp_path / "c", progress=False, verbose=False)
    sa, sb, sc = (x.model.state_dict() for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].shape == sc[k].shape)


@pytest.mark.parametrize("capability, slow", [("AVX2", True), ("AVX512", False)])
def test_bf16_build_warns_on_a_cpu_without_avx512(tmp_path, monkeypatch, recwarn, capability, slow):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    build_testbed(TestbedConfig(**MICRO), cache_dir=tmp_path / "a", progress=False, verbose=False)
    build_testbed(TestbedConfig(**MICRO, bf16=False), cache_dir=tmp_path / "b", progress=False, verbose=False)
    said = [str(w.message) for w in recwarn if "15x slower" in str(w.message)]
    assert said == ([f"testbed {TestbedConfig(**MICRO).short_name}: bfloat16 autocast on a CPU without AVX512 ({capability}) "
                     "is about 15x slower than float32; 'bf16: false' builds faster (a different testbed)"] if slow else [])


def test_corrupt_cache_is_rebuilt_not_used(tmp_path):
    cfg = TestbedConfig(**MICRO)
    first = build_testbed(cfg, cache_dir=tmp_path, progress=False, verbose=False)
    (first.path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unusable"):
        second = build_testbed(cfg, cache_dir=tmp_path, progress=False, verbose=False)
    sa, sb = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # rebuilt, deterministically
    meta = json.loads((first.path / "testbed.json").read_text())
    meta["key"] = "someone-else"
    (first.path / "testbed.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="key mismatch"):
        build_testbed(cfg, cache_dir=tmp_path, progress=False, verbose=False)


@pytest.mark.parametrize("damage", ["fewer layers", "flipped byte", "empty report", "cut corpus"])
def test_damaged_cache_that_still_parses_is_rebuilt(tmp_path, damage):
    """Each of these used to load without a word: a truncated model, a model with changed weights, an empty report
    card, a wrong corpus for C0. testbed.json now holds every file's content hash."""
    cfg = TestbedConfig(**MICRO)
    first = build_testbed(cfg, cache_dir=tmp_path, progress=False, verbose=False)
    p = first.path
    if damage == "fewer layers":
        c = json.loads((p / "config.json").read_text())
        c["num_hidden_layers"] = 1
        (p / "config.json").write_text(json.dumps(c))
        name = "config.json"
    elif damage == "flipped byte":
        data = bytearray((p / "model.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (p / "model.safetensors").write_bytes(bytes(data))
        name = "model.safetensors"
    elif damage == "empty report":
        (p / "report.json").write_text("{}")
        name = "report.json"
    else:
        text = (p / "corpus.txt").read_text()
        (p / "corpus.txt").write_text(text[: len(text) // 2])
        name = "corpus.txt"
    with pytest.warns(UserWarning, match=f"{name} does not match the content hash"):
        second = build_testbed(cfg, cache_dir=tmp_path, progress=False, verbose=False)
    assert second.model.config.num_hidden_layers == MICRO["num_layers"] and second.report["recall"]
    sa, sb = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # rebuilt, deterministically


def test_config_change_changes_cache_key(tmp_path):
    a = TestbedConfig(**MICRO)
    b = dataclasses.replace(a, steps=9)
    assert a.key("x") != b.key("x") and a.key("x") != a.key("y")


def test_data_path_does_not_change_the_key():
    a = TestbedConfig(**MICRO)
    assert a.key("x") == dataclasses.replace(a, data_path="/elsewhere/same.json").key("x")


@pytest.mark.parametrize("key, value, message", [
    ("steps", -5, "'steps': -5 is below the minimum 1"),
    ("hidden_size", 0, "'hidden_size': 0 is below the minimum 1"),
    ("lr", -1.0, "'lr': -1.0 is below the minimum 0.0"),
    ("lr", 0.0, "'lr': 0.0 must be above 0"),
    ("num_heads", 3, "'num_heads': 3 does not divide hidden_size 32"),
    ("warmup", 8, "'warmup': 8 must be below steps (8)"),
])
def test_testbed_config_range_checks(key, value, message):
    """Used to build and cache an untrained model (steps: -5) or crash with a traceback (the others)."""
    from memoe.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(TestbedConfig, {**MICRO, key: value})
