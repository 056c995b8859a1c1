"""The LightningModule that trains a bypass adapter beside a frozen base model.

loss = mean over edit rows of the new target's NLL
     + kl_factor · KL(base || adapted) of the next-token distributions on the KL rows
     + aux_factor · the adapter's auxiliary loss (MEMoE: load balancing; CoachHooK: C0 preservation), if any

The base model is *not* a submodule: Lightning never moves, checkpoints or broadcasts it, and it cannot
enter the optimizer. Only the adapter's parameters are trained and saved. The base's KL references do not change
while the adapter trains: they are computed once, before the first step (bounded by ``KL_CACHE_BYTES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from memoe.batching import pad_batch, row_mean, token_nll
from memoe.config import bounds
from memoe.contexts import ContextOptions
from memoe.training.data import Row, kl_columns

#: The base's KL reference distributions are cached when they fit in this many bytes; else recomputed every step.
KL_CACHE_BYTES = 2 * 2**30


@dataclass
class TrainConfig(ContextOptions):
    """How a bypass adapter learns a batch of edits (and under which context prefixes: :class:`ContextOptions`)."""

    lr: float = field(default=1e-2, metadata=bounds(0.0))
    """AdamW learning rate."""
    weight_decay: float = field(default=0.0, metadata=bounds(0.0))
    """AdamW weight decay."""
    max_steps: int = field(default=300, metadata=bounds(1))
    """Optimiser steps at most (per ``apply`` in sequential modes)."""
    batch_size: int = field(default=128, metadata=bounds(1))
    """Rows (prompts) per step and process."""
    kl_templates: list[str] = field(default_factory=lambda: ["{} is a"])
    """Subject prompts whose next-token distributions (from the subject on) must stay the base model's."""
    kl_other_relations: int = field(default=0, metadata=bounds(0))
    """Per request, this many prompts of *other* relations in the batch, filled with its subject, join the KL rows
    (keeps the subject's other facts: same-subject locality)."""
    same_relation_templates: int = field(default=0, metadata=bounds(0))
    """Per request, this many prompt templates of the *same* relation used by other requests in the batch, filled
    with its subject, join its edit rows (ours: the new fact under the batch's other wordings of the question)."""
    kl_factor: float = field(default=1.0, metadata=bounds(0.0))
    """Weight of the KL term (0: off)."""
    aux_factor: float = field(default=1e-2, metadata=bounds(0.0))
    """Weight of the adapter's auxiliary loss (MEMoE: load balancing; CoachHooK: C0 preservation penalty)."""
    stop_loss: float = field(default=5e-2, metadata=bounds(0.0))
    """Stop once every edit row's latest NLL is below this (0: always run ``max_steps``)."""
    seed: int = 0
    """Seed of row order, router noise and initialisation."""


class AdapterTrainingModule(L.LightningModule):
    def __init__(self, model, adapter, cfg: TrainConfig, rows: list[Row] | None = None):
        super().__init__()
        self.__dict__["base"] = model  # plain attribute: see the module docstring
        self.adapter = adapter
        self.cfg = cfg
        self.rows = rows or []  # the training rows, whose KL references are cached at the start
        self.kl_ref: dict[int, torch.Tensor] | None = None  # row index -> (KL columns, V) base log-probabilities
        self.row_nll: dict[int, float] = {}  # request index -> worst NLL of its rows in the latest pass

    def on_train_epoch_start(self) -> None:
        self.row_nll.clear()  # the stop rule looks at one whole pass over this process's rows

    def on_fit_start(self) -> None:
        if next(self.base.parameters()).device != self.device:  # one process per device under DDP
            self.base.to(self.device)
        self.adapter.train()
        self.kl_ref = self._kl_references()

    @torch.no_grad()
    def _kl_references(self, batch_size: int = 64) -> dict[int, torch.Tensor] | None:
        """The base's next-token log-probabilities at every KL row's KL columns, computed once (adapter off)."""
        kl = [r for r in self.rows if r.kind == "kl"]
        head = self.base.get_output_embeddings()
        vocab = head.weight.shape[0]
        if not kl or self.cfg.kl_factor == 0 or sum(len(kl_columns(r)) for r in kl) * vocab * 4 > KL_CACHE_BYTES:
            return None
        pad_id = self.base.config.pad_token_id if self.base.config.pad_token_id is not None else 0
        out = {}
        with self.adapter.disabled():
            for i in range(0, len(kl), batch_size):
                chunk = kl[i : i + batch_size]
                ids, mask = pad_batch([r.ids for r in chunk], pad_id, self.device)
                hidden = self.base.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                for b, r in enumerate(chunk):
                    out[r.index] = torch.log_softmax(head(hidden[b, list(kl_columns(r))]).float(), -1)  # (cols, V)
        return out

    def configure_optimizers(self):
        return torch.optim.AdamW(self.adapter.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _seed_noise(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.global_step)
        for layer in self.adapter.layers.values():
            layer.seed_noise(g)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._seed_noise()
        base, head = self.base, self.base.get_output_embeddings()
        with self.adapter.given_anchors(batch["spans"]):
            hidden = base.base_model(input_ids=batch["ids"], attention_mask=batch["mask"]).last_hidden_state
        loss = hidden.sum() * 0.0
        if len(batch["edit_rows"]):
            tok_nll = token_nll(head, hidden, batch["edit_rows"], batch["edit_cols"], batch["edit_labels"])
            n_rows = len(batch["edit_requests"])
            row_nll = row_mean(tok_nll, batch["edit_owner"], n_rows)  # (edit rows,)
            nll = row_nll.mean()
            loss = loss + nll
            self.log("train/nll", nll, prog_bar=True, batch_size=n_rows)
            worst: dict[int, float] = {}
            for req, v in zip(batch["edit_requests"].tolist(), row_nll.tolist()):
                worst[req] = max(worst.get(req, 0.0), v)
            self.row_nll.update(worst)
        if self.cfg.kl_factor > 0 and len(batch["kl_rows"]):
            if self.kl_ref is not None:  # collate lists each KL row's columns in order, rows in batch order
                ref_logp = torch.cat([self.kl_ref[int(batch["row_ids"][k])] for k in dict.fromkeys(batch["kl_rows"].tolist())])
            else:
                rows, where = batch["kl_rows"].unique(return_inverse=True)  # the base pass runs on the KL rows only
                with torch.no_grad(), self.adapter.disabled():
                    ref = base.base_model(input_ids=batch["ids"][rows], attention_mask=batch["mask"][rows]).last_hidden_state
                    ref_logp = torch.log_softmax(head(ref[where, batch["kl_cols"]]).float(), -1)
            logp = torch.log_softmax(head(hidden[batch["kl_rows"], batch["kl_cols"]]).float(), -1)
            kl = F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")
            loss = loss + self.cfg.kl_factor * kl
            self.log("train/kl", kl, batch_size=len(batch["kl_rows"]))
        aux = self.adapter.aux_loss()
        if aux is not None and self.cfg.aux_factor > 0:
            loss = loss + self.cfg.aux_factor * aux
            self.log("train/aux", aux, batch_size=len(batch["spans"]))
        self.log("train/loss", loss, batch_size=len(batch["spans"]))
        return loss

    def worst_nll(self) -> float | None:
        return max(self.row_nll.values()) if self.row_nll else None
