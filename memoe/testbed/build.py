"""The knowledge testbed: a small Llama pretrained on the true facts of an edit dataset.

No pretrained model can be downloaded here, so memoe builds one that really knows the facts its editors
will overwrite. ``build_testbed`` trains (or loads from the cache) a ``LlamaForCausalLM`` with a BPE
tokenizer trained on the same text, and writes a report card: recall of the true answers on every probe
set, and a causal trace that says where the model keeps its facts.

Cache layout (``<cache_dir>/<name>-<key>/``): ``config.json`` + ``model.safetensors`` (``save_pretrained``),
the tokenizer files, ``testbed.json`` (the config and key it was built from) and ``report.json``/``trace.png``.
The key hashes the testbed config and the dataset's records, so any change rebuilds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memoe.config import ConfigError, bounds, check_bounds
from memoe.data import EditDataset, World, WorldConfig, build_world, load_edit_dataset
from memoe.errors import CacheError
from memoe.evaluation.scoring import score_pairs
from memoe.io import default_cache_dir, file_sha256, stable_hash, write_json, write_text
from memoe.testbed.corpus import FactCorpus, RecordCorpus, WorldCorpus
from memoe.trace import TraceResult, causal_trace, plot_trace

TESTBED_FORMAT = 1


@dataclass(frozen=True)
class TestbedConfig:
    """Everything a testbed is built from; its hash keys the cache."""

    __test__ = False  # not a pytest class

    dataset: str = "synthetic"
    """Edit dataset whose true facts are learned: synthetic, counterfact, counterfact-easyedit, zsre, or a path."""
    data_path: str | None = None
    """File of a real dataset; default: the shared data directory (``$MEMOE_DATA_DIR`` or ``../shared/data``)."""
    num_edits: int | None = field(default=1000, metadata=bounds(1))
    """Records to learn (synthetic: size of the world; real data: the first N; None: all)."""
    seed: int = 0
    """Seed of the world, the initial weights, batch order and augmentation."""
    hidden_size: int = field(default=128, metadata=bounds(1))
    """Model width."""
    num_layers: int = field(default=6, metadata=bounds(1))
    """Decoder layers; 6 rather than 4 lets knowledge route through the subject position (design notes)."""
    intermediate_size: int = field(default=512, metadata=bounds(1))
    """MLP width: the key dimension of closed-form edits."""
    num_heads: int = field(default=4, metadata=bounds(1))
    """Attention heads."""
    num_kv_heads: int = field(default=2, metadata=bounds(1))
    """Key/value heads (grouped-query attention, as Llama-3)."""
    vocab_size: int = field(default=2048, metadata=bounds(260))
    """BPE vocabulary size (a ceiling: small corpora learn fewer merges)."""
    steps: int = field(default=1500, metadata=bounds(1))
    """Optimiser steps."""
    batch_size: int = field(default=32, metadata=bounds(1))
    """Rows per step."""
    seq_len: int = field(default=64, metadata=bounds(8))
    """Tokens per packed row: whole sentences are packed end to end, not padded."""
    lr: float = field(default=5e-3, metadata=bounds(0.0))
    """Peak AdamW learning rate, reached after ``warmup`` steps, then cosine decay to 1/20 of it."""
    warmup: int = field(default=100, metadata=bounds(0))
    """Linear warm-up steps."""
    weight_decay: float = field(default=0.01, metadata=bounds(0.0))
    """AdamW weight decay."""
    prefix_prob: float = field(default=0.2, metadata=bounds(0.0, 1.0))
    """Chance that a pretraining sentence gets a distracting prefix sentence."""
    trace_facts: int = field(default=40, metadata=bounds(1))
    """Facts averaged in the report card's causal trace."""
    bf16: bool = True
    """Train under bfloat16 autocast (weights stay float32): about 1.5x faster on CPUs with AVX512-BF16, about 15x
    slower on CPUs without AVX512 (the build warns). ``false`` builds a different testbed (another cache entry)."""
    threads: int = field(default=0, metadata=bounds(0))
    """torch threads while building (0: all cores). One process per core is fastest here."""

    def __post_init__(self):
        check_bounds(self)  # also when built in Python, not only from YAML
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr': {self.lr!r} must be above 0")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"config key 'num_heads': {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config key 'num_kv_heads': {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if self.warmup >= self.steps:
            raise ConfigError(f"config key 'warmup': {self.warmup} must be below steps ({self.steps})")

    def key(self, dataset_fingerprint: str) -> str:
        # Where the data was read from does not matter, only what it holds (the fingerprint).
        config = {**dataclasses.asdict(self), "data_path": None}
        return stable_hash({"format": TESTBED_FORMAT, "config": config, "data": dataset_fingerprint})

    @property
    def short_name(self) -> str:
        base = Path(self.dataset).stem if os.sep in self.dataset else self.dataset
        return f"{base}-{self.num_edits or 'all'}"


@dataclass
class Testbed:
    """A built (or loaded) testbed: the model, its tokenizer, the edit dataset and the report card."""

    __test__ = False

    model: torch.nn.Module
    tokenizer: object
    dataset: EditDataset
    config: TestbedConfig
    path: Path
    report: dict = field(default_factory=dict)
    world: World | None = None


def make_corpus(config: TestbedConfig, bad_records: str = "skip") -> tuple[EditDataset, FactCorpus, World | None]:
    """The testbed's dataset and pretraining text. ``bad_records`` as for :func:`memoe.data.load_edit_dataset`
    (``skip``, with a warning naming each, or ``error``); it is not part of the cache key: a dataset with bad records
    either builds the same testbed (skip) or none (error)."""
    if config.dataset == "synthetic":
        world = build_world(WorldConfig(num_edits=config.num_edits or 1000, seed=config.seed))
        return world.dataset, WorldCorpus(world, config.prefix_prob), world
    ds = load_edit_dataset(config.dataset, data_path=config.data_path, limit=config.num_edits, bad_records=bad_records)
    return ds, RecordCorpus(ds, config.prefix_prob), None


def dataset_fingerprint(ds: EditDataset) -> str:
    return stable_hash([r.to_dict() for r in ds.records])


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on the corpus, wrapped as a ``PreTrainedTokenizerFast`` that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.padding_side = "right"
    return tok


def make_model(config: TestbedConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=max(256, 2 * config.seq_len),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(cfg)


def pack(tok, sentences: list[str], seq_len: int) -> torch.Tensor:
    """Sentences as ``<s> text </s>`` end to end, cut into (rows, seq_len) without padding."""
    ids = tok(sentences, add_special_tokens=True)["input_ids"]
    flat = [t for s in ids for t in (*s, tok.eos_token_id)]
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len]).view(n, seq_len)


def pretrain(model, tok, corpus: FactCorpus, config: TestbedConfig, progress: bool = True) -> list[float]:
    """Causal-LM pretraining on packed epochs of the corpus; returns the loss every 50 steps."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    rows = torch.empty(0, config.seq_len, dtype=torch.long)
    cursor, losses = 0, []
    bar = tqdm(range(config.steps), desc="pretraining testbed", disable=not progress)
    for step in bar:
        if cursor + config.batch_size > len(rows):  # a new epoch: fresh augmentation and order
            rows = pack(tok, corpus.sentences(rng), config.seq_len)
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(rng.randrange(2**31)))]
            cursor = 0
        batch = rows[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == config.steps - 1:
            losses.append(round(loss.item(), 4))
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def report_card(model, tok, corpus: FactCorpus, config: TestbedConfig, progress: bool = True) -> dict:
    """Recall (greedy, all target tokens) of every probe set, and the causal trace."""
    recall = {}
    for name, probes in corpus.probes().items():
        s = score_pairs(model, tok, [p.prompt for p in probes], [p.target for p in probes])
        recall[name] = {"recall": sum(s.exact) / len(probes), "n": len(probes)}
    # Single-layer restores of hidden states and MLP outputs: a 6-layer testbed needs no window.
    trace = causal_trace(model, tok, corpus.trace_facts(config.trace_facts), samples=5, seed=config.seed,
                         progress=progress, kinds=("hidden", "mlp"), window=1)
    return {"recall": recall, "trace": trace.to_dict()}


def format_report(report: dict) -> str:
    lines = [f"knowledge testbed {report.get('name', '')}: {report.get('parameters', 0):,} parameters, "
             f"built in {report.get('build_seconds', 0):.0f} s"]
    for name, r in report["recall"].items():
        lines.append(f"  recall {name:<14} {r['recall']:.3f}  (n={r['n']})")
    t = report["trace"]
    lines.append(f"  causal trace over {t['n_facts']} facts: p clean {t['p_clean']:.3f}, corrupted {t['p_corrupt']:.3f}")
    for kind in ("mlp", "hidden"):
        row = "  ".join(f"{p}: " + " ".join(f"{v:+.2f}" for v in t["effects"][kind][p])
                        for p in ("subject_first", "subject_last", "prompt_last"))
        lines.append(f"  {kind:<6} effect per layer  {row}")
    pk = t["peak_mlp"]
    lines.append(f"  MLP peak: layer {pk['layer']} at {pk['position']} (indirect effect {pk['effect']:+.3f})")
    sub = t["effects"]["mlp"]["subject_last"]
    lines.append(f"  subject's last token: MLP peak at layer {max(range(len(sub)), key=sub.__getitem__)} ({max(sub):+.3f})")
    lines.append(f"  knowledge sits at the {storage_site(report)}")
    return "\n".join(lines)


def storage_site(report: dict) -> str:
    """Where the MLPs that recall facts act: ``subject position`` when restoring the subject's last-token MLP
    output recovers more than restoring the prompt's last-token MLP output, over all layers but the last (the
    last layer's MLP at the last token feeds the LM head directly, so it always matters: it reads facts out,
    it does not store them)."""
    eff = report["trace"]["effects"]["mlp"]
    subj, last = max(eff["subject_last"][:-1]), max(eff["prompt_last"][:-1])
    return "subject position" if subj > last else "prompt's last token"


def _load_cached(path: Path, key: str):
    from transformers import AutoTokenizer, LlamaForCausalLM

    meta = json.loads((path / "testbed.json").read_text())
    if meta.get("key") != key or meta.get("format") != TESTBED_FORMAT:
        raise CacheError(f"cache key mismatch ({meta.get('key')} != {key})")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CacheError("written without content hashes (an older memoe)")
    for name, digest in files.items():  # a file that still parses but was changed (fewer layers, flipped bytes, a cut corpus)
        if not (path / name).is_file() or file_sha256(path / name) != digest:
            raise CacheError(f"{name} does not match the content hash stored in testbed.json")
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    report = json.loads((path / "report.json").read_text())
    return model, tok, report


def build_testbed(config: TestbedConfig | None = None, cache_dir: str | os.PathLike | None = None,
                  rebuild: bool = False, progress: bool = True, verbose: bool = True, bad_records: str = "skip") -> Testbed:
    """Load the testbed for ``config`` from the cache, or build, evaluate and cache it.

    A cache entry that fails to load or whose key does not match is rebuilt (with a warning), never used.
    ``bad_records``: ``skip`` (with a warning naming each) or ``error`` for bad records in a real dataset.
    """
    config = config or TestbedConfig()
    dataset, corpus, world = make_corpus(config, bad_records)
    key = config.key(dataset_fingerprint(dataset))
    path = Path(cache_dir or default_cache_dir()) / "testbeds" / f"{config.short_name}-{key}"
    if path.exists() and not rebuild:
        try:
            model, tok, report = _load_cached(path, key)
            model.requires_grad_(False)
            return Testbed(model, tok, dataset, config, path, report, world)
        except (CacheError, OSError, json.JSONDecodeError) as e:  # corrupt, missing or foreign files: rebuild
            warnings.warn(f"testbed cache {path} is unusable ({type(e).__name__}: {e}); rebuilding", stacklevel=2)
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        t0 = time.time()
        probe_texts = [p.prompt + " " + p.target for ps in corpus.probes().values() for p in ps]
        tok = train_tokenizer(corpus.sentences(random.Random(config.seed)) + probe_texts, config.vocab_size)
        model = make_model(config, len(tok))
        cpu = torch.backends.cpu.get_cpu_capability()
        if config.bf16 and not cpu.startswith("AVX512"):
            warnings.warn(f"testbed {config.short_name}: bfloat16 autocast on a CPU without AVX512 ({cpu}) "
                          "is about 15x slower than float32; "
                          "'bf16: false' builds faster (a different testbed)", stacklevel=2)
        losses = pretrain(model, tok, corpus, config, progress)
        build_seconds = time.time() - t0
        report = report_card(model, tok, corpus, config, progress)
    finally:
        torch.set_num_threads(threads_before)
    report.update(name=config.short_name, key=key, parameters=sum(p.numel() for p in model.parameters()),
                  build_seconds=round(build_seconds, 1), losses=losses, config=dataclasses.asdict(config))
    report["storage_site"] = storage_site(report)
    _save(path, model, tok, report, key, corpus, config)
    model.name_or_path = model.config.name_or_path = str(path)  # as if loaded from the cache: editors find corpus.txt there
    model.requires_grad_(False)
    if verbose:
        print(format_report(report))
    return Testbed(model, tok, dataset, config, path, report, world)


def _save(path: Path, model, tok, report: dict, key: str, corpus: FactCorpus, config: TestbedConfig) -> None:
    """Write the whole cache entry into a temporary folder, then rename it into place. ``testbed.json`` holds the
    SHA-256 of every other file, checked on every load. ``corpus.txt`` is one epoch of the pretraining text: the
    closed-form editors' C0 statistics corpus."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    write_json(tmp / "report.json", report)
    write_text(tmp / "corpus.txt", "\n".join(corpus.sentences(random.Random(config.seed))) + "\n")
    t = report["trace"]
    plot_trace(TraceResult(t["num_layers"], t["n_facts"], t["p_clean"], t["p_corrupt"], t["effects"]),
               str(tmp / "trace.png"), title=f"testbed {report['name']}")
    files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.suffix != ".png"}
    write_json(tmp / "testbed.json", {"format": TESTBED_FORMAT, "key": key, "config": report["config"], "files": files})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
