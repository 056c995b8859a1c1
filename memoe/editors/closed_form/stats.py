"""Key statistics C0 = E[k kᵀ]: the second moment of a down-projection's inputs over a text corpus.

Streamed in batches of truncated texts (memory bounded whatever the model's context length), accumulated in
float64, and cached as safetensors keyed by model fingerprint, layer, sample count and dtype. A cache file
that does not load, does not match its key, or holds a non-finite or asymmetric matrix is rebuilt, never used.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import itertools
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from memoe import nethook
from memoe.batching import model_device, pad_batch
from memoe.errors import CacheError, ConfigError, DataError, MissingFileError
from memoe.io import default_cache_dir, file_sha256, load_tensors, save_tensors, stable_hash, tensor_metadata, write_text
from memoe.models.arch import model_fingerprint, model_parts

STATS_FORMAT = "1"


#: Named corpora ``stats_corpus`` accepts besides files and dataset ids.
NAMED_CORPORA = ("auto", "wikipedia", "self")
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def resolve_corpus(source: str, model=None) -> str:
    """The concrete corpus behind ``source``: ``auto`` is a memoe testbed's own ``corpus.txt``, else
    ``wikipedia`` when the ``gensim`` package (which ships a real Wikipedia sample) is installed, else ``self``."""
    if source != "auto":
        return source
    base = getattr(model, "name_or_path", "") if model is not None else ""
    if base and (Path(base) / "corpus.txt").is_file():
        return str(Path(base) / "corpus.txt")
    if importlib.util.find_spec("gensim") is not None:
        return "wikipedia"
    warnings.warn("stats_corpus 'auto': no testbed corpus and no 'gensim' package (pip install gensim==4.4.0 gives "
                  "real Wikipedia text); falling back to text the model samples itself", stacklevel=2)
    return "self"


def _wiki_dump() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise MissingFileError("stats_corpus 'wikipedia' needs the 'gensim' package: pip install gensim==4.4.0")
    dump = Path(spec.origin).parent / WIKI_DUMP
    if not dump.is_file():
        raise MissingFileError(f"stats_corpus 'wikipedia': {dump} is missing from the installed gensim package")
    return dump


def corpus_identity(source: str) -> str:
    """What the statistics cache is keyed by: a file corpus by its content hash (an edited or truncated file is
    a different corpus), the Wikipedia sample by its dump's hash, anything else by its name."""
    if source == "wikipedia":
        return f"wikipedia#sha256:{file_sha256(_wiki_dump())[:16]}"
    if Path(source).is_file():
        return f"{source}#sha256:{file_sha256(source)[:16]}"
    return source


def wikipedia_paragraphs(min_words: int = 20) -> list[str]:
    """Paragraphs of the English Wikipedia sample that the ``gensim`` wheel ships as test data (98 articles,
    ~410,000 words; the text is Wikipedia's, CC BY-SA), cleaned of markup with gensim's own ``filter_wiki``.
    Cached as a text file under ``$MEMOE_CACHE/corpora`` (one paragraph a line)."""
    dump = _wiki_dump()
    cached = default_cache_dir() / "corpora" / f"wikipedia-gensim-{file_sha256(dump)[:16]}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8").splitlines()
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    paragraphs = []
    with bz2.open(dump) as f:
        for _title, text, _pageid in extract_pages(f):
            for para in re.split(r"\n\s*\n", filter_wiki(text)):
                para = " ".join(para.replace("'''", "").replace("''", "").split())
                if not para.startswith("=") and len(para.split()) >= min_words:
                    paragraphs.append(para)
    write_text(cached, "\n".join(paragraphs) + "\n")
    return paragraphs


@torch.no_grad()
def self_generated_texts(model, tok, n: int, length: int = 128, seed: int = 0) -> list[str]:
    """``n`` texts of ``length`` tokens the model samples itself (top-5, from ROME's seed words), deterministic
    under ``seed``: the fallback when no real prose is at hand (it reads less like real text)."""
    device = next(model.parameters()).device
    words = ("The", "Therefore", "Because", "I", "You", "In", "A", "It")
    out: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for b, start in enumerate(range(0, n, 16)):
            k = min(16, n - start)  # one seed word per batch: equal lengths, no padding
            enc = tok([words[b % len(words)]] * k, return_tensors="pt", add_special_tokens=True).to(device)
            ids = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=tok.pad_token_id)
            out += [tok.decode(row, skip_special_tokens=True).strip() for row in ids]
    return out


def corpus_texts(source: str, model=None, tok=None, samples: int = 20_000, max_length: int = 128, seed: int = 0) -> Iterator[str]:
    """Texts for the statistics.

    ``source``: ``auto`` (see :func:`resolve_corpus`), ``wikipedia`` (:func:`wikipedia_paragraphs`), ``self``
    (:func:`self_generated_texts`, enough for ``samples`` tokens), a local ``.txt`` (one text per line), a
    local ``.json``/``.jsonl`` with a ``text`` field, or a Hugging Face dataset id ``name[:config]`` (streamed;
    needs the hub), e.g. ``wikitext:wikitext-103-raw-v1``.
    """
    source = resolve_corpus(source, model)
    if source == "wikipedia":
        yield from wikipedia_paragraphs()
        return
    if source == "self":
        if model is None or tok is None:
            raise ConfigError("stats_corpus 'self' needs the model and its tokenizer")
        yield from self_generated_texts(model, tok, -(-samples // max_length), max_length, seed)
        return
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
            raise DataError(f"stats corpus {source}: rows need a 'text' field, got {sorted(row)}")
        if row["text"].strip():
            yield row["text"]


@torch.no_grad()
def second_moments(model, tok, texts: Iterable[str], layers: list[int], samples: int, batch_size: int = 32,
                   max_length: int = 128, progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """Per layer, the (d, d) float64 mean of k kᵀ over the same ``samples`` non-padding tokens, all ``layers`` read in
    one pass that stops at the highest; returns ({layer: C0}, tokens used)."""
    parts = model_parts(model)
    names = {l: parts.name("down_proj", l) for l in layers}
    device = model_device(model)
    acc: dict[int, torch.Tensor] = {}
    count = 0
    it = iter(texts)
    which = ", ".join(map(str, layers))
    bar = tqdm(total=samples, desc=f"key statistics, layer{'s' if len(layers) > 1 else ''} {which}", unit="tok",
               disable=not progress, leave=False)
    while count < samples:
        chunk = list(itertools.islice(it, batch_size))
        if not chunk:
            break
        ids = [x[:max_length] for x in tok(chunk, add_special_tokens=True)["input_ids"]]
        batch, mask = pad_batch(ids, tok.pad_token_id, device)
        with nethook.capture(model, list(names.values()), inputs=True, stop=True) as store:  # the layers above never run
            model.base_model(input_ids=batch, attention_mask=mask)
        n = 0
        for l, name in names.items():
            k = store[name][mask.bool()].double()[: samples - count]  # (tokens, d): padding never enters the statistics
            acc[l] = k.T @ k if l not in acc else acc[l] + k.T @ k
            n = k.shape[0]
        count += n
        bar.update(n)
    bar.close()
    if not acc or count == 0:
        raise DataError("the stats corpus yielded no tokens")
    return {l: C / count for l, C in acc.items()}, count


def second_moment(model, tok, texts: Iterable[str], layer: int, samples: int, batch_size: int = 32,
                  max_length: int = 128, progress: bool = True) -> tuple[torch.Tensor, int]:
    """(d, d) float64 mean of k kᵀ over up to ``samples`` non-padding tokens of one layer; returns (C0, tokens used)."""
    C, count = second_moments(model, tok, texts, [layer], samples, batch_size, max_length, progress)
    return C[layer], count


def _cache_path(cache_dir: Path, fingerprint: str, layer: int, samples: int, dtype: str, corpus: str) -> Path:
    return cache_dir / "stats" / fingerprint / f"layer{layer}-n{samples}-{dtype}-{stable_hash(corpus, 8)}.safetensors"


def _read_cached(path: Path, meta: dict, d: int) -> torch.Tensor | None:
    """The cached C0 at ``path`` if it exists and checks out (metadata, shape, symmetry, content hash); else None."""
    if not path.exists():
        return None
    try:
        stored = tensor_metadata(path)
        bad = [k for k, v in meta.items() if stored.get(k) != v]
        if bad:
            raise CacheError(f"metadata mismatch in {bad}")
        C = load_tensors(path)["C0"]
        if C.shape != (d, d) or C.dtype != torch.float64 or not torch.isfinite(C).all() or not torch.allclose(C, C.T):
            raise CacheError(f"bad matrix (shape {tuple(C.shape)}, dtype {C.dtype})")
        if stored.get("sha256") != _tensor_sha(C):
            raise CacheError("the matrix does not match its stored content hash")
        return C
    except (CacheError, KeyError) as e:  # KeyError: a safetensors file without the "C0" tensor
        warnings.warn(f"key statistics cache {path} is unusable ({e}); recomputing", stacklevel=3)
        return None


def layers_stats(model, tok, layers: list[int], corpus: str = "auto", samples: int = 20_000,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 32, max_length: int = 128,
                 progress: bool = True) -> dict[int, torch.Tensor]:
    """C0 for each of ``layers``: from the cache where a valid entry exists; the others computed in one pass over the
    corpus and cached."""
    parts = model_parts(model)
    layers = sorted({parts.check_layer(l) for l in layers})
    fp, dtype = model_fingerprint(model), str(next(model.parameters()).dtype).replace("torch.", "")
    corpus = resolve_corpus(corpus, model)
    identity = corpus_identity(corpus)
    out, paths, metas = {}, {}, {}
    for l in layers:
        paths[l] = _cache_path(Path(cache_dir or default_cache_dir()), fp, l, samples, dtype, identity)
        metas[l] = {"format": STATS_FORMAT, "fingerprint": fp, "layer": str(l), "samples": str(samples), "dtype": dtype,
                    "corpus": identity}
        C = _read_cached(paths[l], metas[l], parts.down_proj_weight(l).shape[1])
        if C is not None:
            out[l] = C
    missing = [l for l in layers if l not in out]
    if missing:
        texts = corpus_texts(corpus, model, tok, samples, max_length)
        computed, count = second_moments(model, tok, texts, missing, samples, batch_size, max_length, progress)
        for l, C in computed.items():
            save_tensors(paths[l], {"C0": C}, metadata={**metas[l], "count": str(count), "sha256": _tensor_sha(C)})
            out[l] = C
    return out


def layer_stats(model, tok, layer: int, corpus: str = "auto", samples: int = 20_000, cache_dir: str | os.PathLike | None = None,
                batch_size: int = 32, max_length: int = 128, progress: bool = True) -> torch.Tensor:
    """C0 for ``layer``, from the cache when a valid entry exists, else computed and cached."""
    layer = model_parts(model).check_layer(layer)
    return layers_stats(model, tok, [layer], corpus, samples, cache_dir, batch_size, max_length, progress)[layer]


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()
