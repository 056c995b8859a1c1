"""LTE's alignment phase: teach the model, once, to *use* an edit put before a query (Jiang et al. 2024).

The parallel dataset is built from edit records that are never evaluated. Each record's statement s ("<prompt>
<new target>") goes in LTE's template (:func:`memoe.retrieval.in_context_prompt`) before

- **in-scope** queries: the request and ``paraphrases`` of its paraphrase prompts, answered with the new target;
- **out-of-scope** queries: ``neighbours`` of its neighbourhood prompts (same relation, other subject) and
  ``unrelated`` request prompts of other records, answered as the *unedited* model answers them bare (greedy);

and ``plain`` rows keep the model's behaviour without any statement: a prompt of the record (its generation or
locality prompt, else its request) continued as the unedited model continues it. The paper's data mixes the same
three kinds (in-scope, out-of-scope, and general instruction data for fluency) from several benchmarks with GPT-4
written answers; its exact proportions come with its released data, which cannot be downloaded here. Ours: per
record 1 + ``paraphrases`` in-scope, ``neighbours`` + ``unrelated`` out-of-scope and ``plain`` plain rows, every answer
the base model's own (no GPT-4), no chat template (the paper's Llama inference used none either).

Training: LoRA on the attention's query, key and value projections (the paper's LoRA), zero-initialised, loss the
mean NLL of each row's answer tokens, through the same Lightning Trainer as the bypass adapters (accelerator, DDP,
precision, pickle-free checkpoints, resume). The result is a standard PEFT adapter folder.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from peft import LoraConfig
from torch import nn
from torch.utils.data import DataLoader, Sampler

from memoe.adapters.lora import inject_lora, lora_layers, lora_tensors, remove_lora, save_peft
from memoe.batching import encode_pairs, final_hidden, pad_batch, row_mean, target_index, token_nll
from memoe.config import bounds
from memoe.data.records import EditRecord
from memoe.errors import DataError
from memoe.retrieval import in_context_prompt
from memoe.training.trainer import TrainerOptions, make_trainer, quiet, resume_path


@dataclass
class AlignConfig:
    """LTE's alignment phase: the parallel dataset and the LoRA trained on it."""

    sources: list[str] = field(default_factory=lambda: ["counterfact-easyedit:1000:1400", "zsre:670:870"])
    """Edit records the dataset is built from, ``dataset:start:stop`` each (never the evaluated ones: CounterFact's
    and zsRE's evaluations read the first records of ``counterfact``/``counterfact-easyedit`` and ``zsre``)."""
    paraphrases: int = field(default=1, metadata=bounds(0))
    """In-scope paraphrase queries per record (beside the request itself)."""
    neighbours: int = field(default=1, metadata=bounds(0))
    """Out-of-scope neighbourhood queries per record."""
    unrelated: int = field(default=1, metadata=bounds(0))
    """Out-of-scope queries per record taken from other records' requests."""
    plain: int = field(default=1, metadata=bounds(0))
    """Rows per record without any statement, continued as the unedited model continues them."""
    answer_tokens: int = field(default=12, metadata=bounds(1))
    """Most tokens of an unedited-model answer (out-of-scope and plain rows)."""
    rank: int = field(default=8, metadata=bounds(1))
    """LoRA rank."""
    alpha: float = field(default=16.0, metadata=bounds(0.0))
    """LoRA alpha (scaling alpha / rank)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    """Module names LoRA wraps (the paper: query, key and value projections)."""
    lr: float = field(default=1e-3, metadata=bounds(0.0))
    """AdamW learning rate."""
    max_steps: int = field(default=300, metadata=bounds(1))
    """Optimiser steps."""
    batch_size: int = field(default=16, metadata=bounds(1))
    """Rows per step and process."""
    seed: int = 0
    """Seed of the row sampling, order and LoRA initialisation."""
    output_dir: str = "runs/lte-lora"
    """Where ``train.py --align`` saves the LoRA (a PEFT adapter folder) and ``alignment.json``."""


@dataclass(frozen=True)
class AlignRow:
    prompt: str
    target: str
    kind: str
    """``in-scope``, ``out-of-scope`` or ``plain``."""


def alignment_rows(records: list[EditRecord], cfg: AlignConfig, answer: Callable[[list[str]], list[str]]) -> list[AlignRow]:
    """The parallel dataset of ``records`` (see the module docstring). ``answer`` gives the unedited model's greedy
    answers to bare prompts (one batched call); rows whose answer is empty are left out."""
    if len(records) < 2:
        raise DataError(f"the alignment data needs at least 2 records, got {len(records)}")
    rng = random.Random(cfg.seed)
    rows: list[AlignRow] = []
    ask: list[tuple[str, str, str]] = []  # (row prompt, bare query the base answers, kind)
    for i, rec in enumerate(records):
        r = rec.request
        fact = f"{r.text} {r.target_new}"
        for q in [r.text] + rng.sample(list(rec.paraphrase_prompts), min(cfg.paraphrases, len(rec.paraphrase_prompts))):
            rows.append(AlignRow(in_context_prompt(q, [fact]), r.target_new, "in-scope"))
        others = [j for j in rng.sample(range(len(records)), min(len(records), cfg.unrelated + 1)) if j != i][: cfg.unrelated]
        out = rng.sample(list(rec.neighborhood_prompts), min(cfg.neighbours, len(rec.neighborhood_prompts)))
        for q in out + [records[j].request.text for j in others]:
            ask.append((in_context_prompt(q, [fact]), q, "out-of-scope"))
        plain = list(rec.generation_prompts) + [lp.prompt for lp in rec.locality_prompts] or [r.text]
        for q in rng.sample(plain, min(cfg.plain, len(plain))):
            ask.append((q, q, "plain"))
    answers = answer([q for _, q, _ in ask])
    rows += [AlignRow(p, a.strip(), kind) for (p, _, kind), a in zip(ask, answers) if a.strip()]
    rng.shuffle(rows)
    return rows


def lora_config(cfg: AlignConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")


def _collate(tok, rows: list[AlignRow]) -> dict:
    p_ids, t_ids = encode_pairs(tok, [r.prompt for r in rows], [r.target for r in rows])
    ids, mask = pad_batch([p + t for p, t in zip(p_ids, t_ids)], tok.pad_token_id, "cpu")
    tr, tc, labels = target_index(p_ids, t_ids)
    return {"ids": ids, "mask": mask, "rows": torch.tensor(tr), "cols": torch.tensor(tc), "labels": torch.tensor(labels)}


class ShuffledShard(Sampler):
    """Row indices reshuffled every pass (seeded by the pass), each DDP process taking every W-th: the processes of a
    multi-process run see disjoint rows, whatever the launcher (Lightning's own sampler is off in memoe's Trainer)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)).tolist()
        self.epoch += 1
        return iter(perm[rank::world])

    def __len__(self) -> int:
        return self.n


class AlignmentModule(L.LightningModule):
    """Mean answer NLL of a batch of rows; only the LoRA matrices are trained (and checkpointed)."""

    def __init__(self, model, cfg: AlignConfig):
        super().__init__()
        self.__dict__["base"] = model  # plain attribute: Lightning never moves, checkpoints or broadcasts the base
        layers = lora_layers(model)
        self.lora = nn.ModuleDict({n.replace(".", "/"): nn.ModuleList([m.lora_A, m.lora_B]) for n, m in layers.items()})
        self.cfg = cfg

    def on_fit_start(self) -> None:
        if next(self.base.parameters()).device != self.device:
            self.base.to(self.device)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.lora.parameters(), lr=self.cfg.lr)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hidden = final_hidden(self.base, batch["ids"], batch["mask"])  # (B, T, H)
        tok_nll = token_nll(self.base.get_output_embeddings(), hidden, batch["rows"], batch["cols"], batch["labels"])
        loss = row_mean(tok_nll, batch["rows"], batch["ids"].shape[0]).mean()  # every row counts once
        self.log("train/nll", loss, prog_bar=True, batch_size=batch["ids"].shape[0])
        return loss


def fit_alignment(model, tok, rows: list[AlignRow], cfg: AlignConfig, opts: TrainerOptions | None = None) -> dict:
    """Attach a zero-initialised LoRA to ``model`` (in place, :func:`memoe.adapters.lora.inject_lora`) and train it on
    ``rows``; returns steps, seconds, rows per kind, the first and last logged loss, the devices and strategy, and
    whether this process is the global rank zero (DDP)."""
    opts = opts or TrainerOptions()
    if not rows:
        raise DataError("no alignment rows to train on")
    resume = resume_path(opts)
    torch.manual_seed(cfg.seed)
    inject_lora(model, lora_config(cfg))
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    loader = DataLoader(rows, batch_size=cfg.batch_size, sampler=ShuffledShard(len(rows), cfg.seed), collate_fn=lambda b: _collate(tok, b))
    module = AlignmentModule(model, cfg)
    losses: list[float] = []

    class _Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout in the base; the LoRA has none either
    try:
        with quiet(not opts.progress):
            trainer = make_trainer(opts, model, cfg.max_steps, [_Record()])
            trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    except BaseException:
        remove_lora(model)  # a failed alignment leaves the model as it found it
        raise
    finally:
        model.train(was_training)
    model.requires_grad_(False)  # trained: frozen like the base (remove_lora gives back the flags from before)
    kinds = {k: sum(r.kind == k for r in rows) for k in ("in-scope", "out-of-scope", "plain")}
    return {"steps": trainer.global_step, "seconds": time.perf_counter() - t0, "rows": len(rows), "rows_by_kind": kinds,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "devices": trainer.num_devices, "strategy": type(trainer.strategy).__name__, "global_zero": trainer.is_global_zero}


def save_alignment(model, cfg: AlignConfig, path: str | Path) -> Path:
    """The attached LoRA as a PEFT adapter folder (``PeftModel.from_pretrained(base, path)`` loads it)."""
    config = lora_config(cfg)
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return save_peft(path, config, lora_tensors(model))


__all__ = ["AlignConfig", "AlignRow", "AlignmentModule", "alignment_rows", "fit_alignment", "lora_config", "save_alignment"]
