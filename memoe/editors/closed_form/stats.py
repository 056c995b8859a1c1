"""Key statistics C0 = E[k kᵀ]: the second moment of a down-projection's inputs over a text corpus.

Streamed in batches of truncated texts (memory bounded whatever the model's context length), accumulated in
float64, and cached as safetensors keyed by model fingerprint, layer, sample count and dtype. A cache file
that does not load, does not match its key, or holds a non-finite or asymmetric matrix is rebuilt, never used.
"""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from memoe import nethook
from memoe.evaluation.scoring import model_device, pad_batch
from memoe.io import load_tensors, save_tensors, stable_hash
from memoe.models.arch import model_fingerprint, model_parts

STATS_FORMAT = "1"


def corpus_texts(source: str, model=None) -> Iterator[str]:
    """Texts for the statistics.

    ``source``: ``auto`` (the ``corpus.txt`` a memoe testbed keeps beside its weights), a local ``.txt``
    (one text per line), a local ``.json``/``.jsonl`` with a ``text`` field, or a Hugging Face dataset id
    ``name[:config]`` (streamed; needs the hub).
    """
    if source == "auto":
        base = getattr(model, "name_or_path", "") if model is not None else ""
        path = Path(base) / "corpus.txt" if base else None
        if path is None or not path.exists():
            raise FileNotFoundError(
                "stats_corpus='auto' needs a memoe testbed (its corpus.txt); for other models set stats_corpus "
                "to a text file (one text per line) or a dataset id such as 'wikitext:wikitext-103-raw-v1'")
        source = str(path)
    p = Path(source)
    if p.suffix == ".txt" and p.exists():
        with p.open(encoding="utf-8") as f:
            yield from (line.rstrip("\n") for line in f if line.strip())
        return
    import datasets

    if p.exists():
        ds = datasets.load_dataset("json", data_files=str(p), split="train", streaming=True)
    else:
        name, _, config = source.partition(":")
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    for row in ds:
        if "text" not in row:
            raise KeyError(f"stats corpus {source}: rows need a 'text' field, got {sorted(row)}")
        if row["text"].strip():
            yield row["text"]


@torch.no_grad()
def second_moment(model, tok, texts: Iterable[str], layer: int, samples: int, batch_size: int = 32,
                  max_length: int = 128, progress: bool = True) -> tuple[torch.Tensor, int]:
    """(d, d) float64 mean of k kᵀ over up to ``samples`` non-padding tokens; returns (C0, tokens used)."""
    parts = model_parts(model)
    name = parts.name("down_proj", layer)
    device = model_device(model)
    acc: torch.Tensor | None = None
    count = 0
    it = iter(texts)
    bar = tqdm(total=samples, desc=f"key statistics, layer {layer}", unit="tok", disable=not progress, leave=False)
    while count < samples:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            break
        ids = [x[:max_length] for x in tok(chunk, add_special_tokens=True)["input_ids"]]
        batch, mask = pad_batch(ids, tok.pad_token_id, device)
        with nethook.capture(model, [name], inputs=True) as store:
            model.base_model(input_ids=batch, attention_mask=mask)
        k = store[name][mask.bool()].double()  # (tokens, d): padding never enters the statistics
        k = k[: samples - count]
        acc = k.T @ k if acc is None else acc + k.T @ k
        count += k.shape[0]
        bar.update(k.shape[0])
    bar.close()
    if acc is None or count == 0:
        raise ValueError("the stats corpus yielded no tokens")
    return acc / count, count


def _cache_path(cache_dir: Path, fingerprint: str, layer: int, samples: int, dtype: str, corpus: str) -> Path:
    return cache_dir / "stats" / fingerprint / f"layer{layer}-n{samples}-{dtype}-{stable_hash(corpus, 8)}.safetensors"


def layer_stats(model, tok, layer: int, corpus: str = "auto", samples: int = 20_000, cache_dir: str | os.PathLike | None = None,
                batch_size: int = 32, max_length: int = 128, progress: bool = True) -> torch.Tensor:
    """C0 for ``layer``, from the cache when a valid entry exists, else computed and cached."""
    from memoe.testbed.build import default_cache_dir

    parts = model_parts(model)
    layer = parts.check_layer(layer)
    d = parts.down_proj_weight(layer).shape[1]
    fp, dtype = model_fingerprint(model), str(next(model.parameters()).dtype).replace("torch.", "")
    path = _cache_path(Path(cache_dir or default_cache_dir()), fp, layer, samples, dtype, corpus)
    meta = {"format": STATS_FORMAT, "fingerprint": fp, "layer": str(layer), "samples": str(samples), "dtype": dtype, "corpus": corpus}
    if path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                stored = f.metadata() or {}
            bad = [k for k, v in meta.items() if stored.get(k) != v]
            if bad:
                raise ValueError(f"metadata mismatch in {bad}")
            C = load_tensors(path)["C0"]
            if C.shape != (d, d) or C.dtype != torch.float64 or not torch.isfinite(C).all() or not torch.allclose(C, C.T):
                raise ValueError(f"bad matrix (shape {tuple(C.shape)}, dtype {C.dtype})")
            return C
        except Exception as e:
            warnings.warn(f"key statistics cache {path} is unusable ({e}); recomputing", stacklevel=2)
    C, count = second_moment(model, tok, corpus_texts(corpus, model), layer, samples, batch_size, max_length, progress)
    save_tensors(path, {"C0": C}, metadata={**meta, "count": str(count)})
    return C
