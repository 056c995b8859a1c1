import dataclasses
import json

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


def test_config_change_changes_cache_key(tmp_path):
    a = TestbedConfig(**MICRO)
    b = dataclasses.replace(a, steps=9)
    assert a.key("x") != b.key("x") and a.key("x") != a.key("y")


def test_data_path_does_not_change_the_key():
    a = TestbedConfig(**MICRO)
    assert a.key("x") == dataclasses.replace(a, data_path="/elsewhere/same.json").key("x")
