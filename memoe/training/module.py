"""The LightningModule that trains a bypass adapter beside a frozen base model.

loss = mean over edit rows of the new target's NLL
     + kl_factor · KL(base || adapted) of the next-token distributions on the KL rows
     + gate_factor · the adapter's supervised gate loss, if it has a gate (MEMoE's relation gate: open on the
       edit rows' answer positions, shut on the KL rows)
     + aux_factor · the adapter's auxiliary loss (MEMoE: load balancing; CoachHooK: C0 preservation), if any

The base model is *not* a submodule: Lightning never moves, checkpoints or broadcasts it, and it cannot
enter the optimizer. Only the adapter's parameters are trained and saved. The base's KL references do not change
while the adapter trains: they are computed once, before the first step (bounded by ``KL_CACHE_BYTES``). Nor does
what the adapter cannot reach: the blocks below its lowest layer, and each row's tokens before the first one the
adapter may change (MEMoE: the anchor's last token) or a loss reads. That is computed once too
(:mod:`memoe.frozen_prefix`, bounded by ``PREFIX_CACHE_BYTES``), and every step runs only the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from memoe.batching import pad_batch, row_mean, token_nll
from memoe.config import bounds
from memoe.contexts import ContextOptions
from memoe.frozen_prefix import FrozenPrefix
from memoe.training.data import Row, kl_columns

#: The base's KL reference distributions are cached when they fit in this many bytes; else recomputed every step.
KL_CACHE_BYTES = 2 * 2**30
#: The rows' untouched prefixes (KV cache, lower blocks' states) are cached when they fit in this many bytes; else
#: every step runs the whole rows through the whole model.
PREFIX_CACHE_BYTES = 2 * 2**30


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
    gate_factor: float = field(default=1.0, metadata=bounds(0.0))
    """Weight of the supervised gate loss of an adapter that has one (MEMoE with ``relation_keys``: its relation gate
    should open at the edit rows' answer positions and stay shut on the KL rows)."""
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
        self.prefix: FrozenPrefix | None = None  # what the adapter cannot change, computed at the start
        self.heads: dict[int, int] = {}  # row index -> its leading tokens that every step leaves out
        self.anchor_ids: dict[int, int] = {}  # row index -> its subject's anchor id (-1: not an anchor)

    def on_train_epoch_start(self) -> None:
        self.row_nll.clear()  # the stop rule looks at one whole pass over this process's rows

    def on_fit_start(self) -> None:
        if next(self.base.parameters()).device != self.device:  # one process per device under DDP
            self.base.to(self.device)
        self.adapter.train()
        trie = self.adapter.trie
        self.anchor_ids = {r.index: trie.owner_of(r.ids[r.span[0] : r.span[1]]) if trie is not None else -1 for r in self.rows}
        self.kl_ref = self._kl_references()
        self.prefix = self._frozen_prefix()

    @torch.no_grad()
    def _kl_references(self, batch_size: int = 64) -> dict[int, torch.Tensor] | None:
        """The base's next-token log-probabilities at every KL row's KL columns, computed once (adapter off)."""
        kl = [r for r in self.rows if r.kind == "kl"]
        head = self.base.get_output_embeddings()
        vocab = head.weight.shape[0]
        if not kl or self.cfg.kl_factor == 0 or sum(len(kl_columns(r)) for r in kl) * vocab * 4 > KL_CACHE_BYTES:
            return None
        pad_id = self._pad_id()
        out = {}
        with self.adapter.disabled():
            for i in range(0, len(kl), batch_size):
                chunk = kl[i : i + batch_size]
                ids, mask = pad_batch([r.ids for r in chunk], pad_id, self.device)
                hidden = self.base.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                for b, r in enumerate(chunk):
                    out[r.index] = torch.log_softmax(head(hidden[b, list(kl_columns(r))]).float(), -1)  # (cols, V)
        return out

    def _pad_id(self) -> int:
        pad = self.base.config.pad_token_id
        return pad if pad is not None else 0

    def configure_optimizers(self):
        return torch.optim.AdamW(self.adapter.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _seed_noise(self) -> None:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.global_step)
        for layer in self.adapter.layers.values():
            layer.seed_noise(g)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._seed_noise()
        head = self.base.get_output_embeddings()
        if self.prefix is not None:
            batch = self._tails(batch)
        ids = [[self.anchor_ids.get(k, -1)] for k in batch["row_ids"].tolist()]
        with self.adapter.given_anchors(batch["spans"], ids):
            hidden = self._hidden(batch, torch.arange(len(batch["ids"])))
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
                    ref = self._hidden(batch, rows)
                    ref_logp = torch.log_softmax(head(ref[where, batch["kl_cols"]]).float(), -1)
            logp = torch.log_softmax(head(hidden[batch["kl_rows"], batch["kl_cols"]]).float(), -1)
            kl = F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")
            loss = loss + self.cfg.kl_factor * kl
            self.log("train/kl", kl, batch_size=len(batch["kl_rows"]))
        if self.cfg.gate_factor > 0:  # open where an edit row's answer is read, shut on the KL rows
            rows, cols = torch.cat([batch["edit_rows"], batch["kl_rows"]]), torch.cat([batch["edit_cols"], batch["kl_cols"]])
            wanted = torch.cat([torch.ones(len(batch["edit_rows"])), torch.zeros(len(batch["kl_rows"]))]).to(hidden.device)
            gate = self.adapter.gate_loss(rows, cols, wanted)
            if gate is not None:
                loss = loss + self.cfg.gate_factor * gate
                self.log("train/gate", gate, batch_size=len(rows))
        aux = self.adapter.aux_loss()
        if aux is not None and self.cfg.aux_factor > 0:
            loss = loss + self.cfg.aux_factor * aux
            self.log("train/aux", aux, batch_size=len(batch["spans"]))
        self.log("train/loss", loss, batch_size=len(batch["spans"]))
        return loss

    @torch.no_grad()
    def _frozen_prefix(self, batch_size: int = 64) -> FrozenPrefix | None:
        """The base's pass over every row up to what the adapter can change (see the module doc), or None when
        that is nothing (or too big to keep)."""
        first = min(int(k) for k in self.adapter.layers)
        loss_from = lambda r: r.span[1] - 1 if r.kind == "kl" else len(r.ids) - r.n_target - 1  # first column read
        self.heads = {r.index: max(0, min(self.adapter.untouched_before(r.span), loss_from(r))) for r in self.rows}
        cfg = self.base.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_bytes = 2 * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * head_dim * 4  # K and V, a token
        size = sum(self.heads.values()) * (self.adapter.base_info["num_layers"] - first) * kv_bytes
        if (first == 0 and not any(self.heads.values())) or size > PREFIX_CACHE_BYTES:
            return None
        prefix = FrozenPrefix(self.base, first)
        pad_id = self._pad_id()
        with self.adapter.disabled():
            for i in range(0, len(self.rows), batch_size):
                chunk = self.rows[i : i + batch_size]
                ids, mask = pad_batch([r.ids for r in chunk], pad_id, self.device)
                out, state = prefix.record(input_ids=ids, attention_mask=mask)
                for b, r in enumerate(chunk):
                    prefix.keep(r.index, out, state, b, self.heads[r.index], len(r.ids))
                del out, state
        return prefix

    def _tails(self, batch: dict) -> dict:
        """``batch`` with each row from its head on (ids, mask, the loss columns and the anchor spans shifted)."""
        heads = torch.tensor([self.heads[int(k)] for k in batch["row_ids"]], device=batch["ids"].device)
        lengths = batch["mask"].sum(1).tolist()
        pad_id = self._pad_id()
        ids, mask = pad_batch([row[h:n].tolist() for row, h, n in zip(batch["ids"], heads.tolist(), lengths)], pad_id,
                              batch["ids"].device)
        spans = [[(s - h, e - h) for s, e in row] for row, h in zip(batch["spans"], heads.tolist())]
        return {**batch, "ids": ids, "mask": mask, "spans": spans, "heads": heads,
                "edit_cols": batch["edit_cols"] - heads[batch["edit_rows"]],
                "kl_cols": batch["kl_cols"] - heads[batch["kl_rows"]]}

    def _hidden(self, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), T, H) the final hidden states of ``rows`` of ``batch`` (whole, or from their heads on)."""
        ids, mask = batch["ids"][rows], batch["mask"][rows]
        if self.prefix is None:
            return self.base.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        keys = batch["row_ids"][rows].tolist()
        return self.prefix.forward(keys, ids, mask, batch["heads"][rows].tolist()).last_hidden_state

    def worst_nll(self) -> float | None:
        return max(self.row_nll.values()) if self.row_nll else None
