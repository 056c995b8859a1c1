"""Training rows for bypass adapters: edit requests teacher-forced, prompt tokens masked, anchors given.

Each request gives one *edit row* per context prefix (the bare prompt plus each prefix: the prefix
augmentation; with ``same_relation_templates``, also under the batch's other templates of its relation) whose
loss is the new target's NLL, and one *KL row* per KL template ("{} is a") whose loss keeps
the base model's next-token distributions from the subject's last token on (with ``kl_other_relations``, also
prompts of other relations in the batch filled with the request's subject: its other facts must stay, the
same-subject locality). Every row carries its subject
span, the knowledge anchor the router is trained with. Rows are shuffled once with the seed; the batch of
global step s is then rows [(s·W + r)·B, (s·W + r + 1)·B) read cyclically (W processes, rank r, B rows), a
function of the step alone, so a run resumed from a checkpoint sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from memoe.batching import encode_pairs, pad_batch, target_index
from memoe.contexts import prefixed
from memoe.data.records import EditRequest
from memoe.errors import DataError
from memoe.tokens import subject_span


@dataclass
class Row:
    ids: list[int]
    span: tuple[int, int]
    """[start, end) of the subject (the anchor) in ``ids``."""
    kind: str
    """``edit`` (target NLL on the last ``n_target`` tokens) or ``kl`` (KL from the anchor's last token on)."""
    n_target: int = 0
    request: int = 0
    index: int = 0
    """Position in the (shuffled) row list: what the base's cached KL references are keyed by."""


def relation_templates(requests: list[EditRequest], i: int, k: int, rng: random.Random, same: bool) -> list[str]:
    """Up to ``k`` prompt templates that other requests among ``requests`` use, of request i's own relation
    (``same``) or of other relations, to fill with request i's subject."""
    own = requests[i]
    if same and not own.relation:
        return []
    if same:
        wanted = lambda r: r.relation == own.relation
    else:  # not a relation whose fact of this subject the batch also edits: that one must change
        edited = {r.relation for r in requests if r.subject == own.subject and r.relation}
        wanted = lambda r: not own.relation or r.relation not in edited
    pool = sorted({r.prompt for r in requests if r.prompt != own.prompt and wanted(r)})
    return rng.sample(pool, min(k, len(pool)))


def build_rows(tok, requests: list[EditRequest], prefixes: list[str], kl_templates: list[str], seed: int = 0,
               kl_other_relations: int = 0, same_relation: int = 0) -> list[Row]:
    rows: list[Row] = []
    rng = random.Random(seed)
    for i, r in enumerate(requests):
        templates = prefixed(r.prompt, prefixes) + relation_templates(requests, i, same_relation, rng, same=True)
        p_ids, t_ids = encode_pairs(tok, [t.replace("{}", r.subject) for t in templates], [r.target_new] * len(templates))
        for tpl, p, t in zip(templates, p_ids, t_ids):
            rows.append(Row(p + t, subject_span(tok, tpl, r.subject), "edit", len(t), i))
        for tpl in kl_templates + relation_templates(requests, i, kl_other_relations, rng, same=False):
            ids = tok(tpl.replace("{}", r.subject), add_special_tokens=True)["input_ids"]
            rows.append(Row(ids, subject_span(tok, tpl, r.subject), "kl", 0, i))
    rng.shuffle(rows)
    for k, r in enumerate(rows):
        r.index = k
    return rows


def collate(rows: list[Row], pad_id: int) -> dict:
    """Pad a list of rows into tensors plus the index lists the losses gather with."""
    ids, mask = pad_batch([r.ids for r in rows], pad_id, "cpu")
    edit = [k for k, r in enumerate(rows) if r.kind == "edit"]
    p_ids = [rows[k].ids[: len(rows[k].ids) - rows[k].n_target] for k in edit]
    t_ids = [rows[k].ids[len(rows[k].ids) - rows[k].n_target :] for k in edit]
    tr, tc, labels = target_index(p_ids, t_ids)
    kl_rows, kl_cols = [], []
    for k, r in enumerate(rows):
        if r.kind == "kl":
            for c in kl_columns(r):
                kl_rows.append(k)
                kl_cols.append(c)
    return {
        "ids": ids, "mask": mask, "spans": [[r.span] for r in rows],
        "edit_rows": torch.tensor([edit[i] for i in tr], dtype=torch.long), "edit_cols": torch.tensor(tc, dtype=torch.long),
        "edit_labels": torch.tensor(labels, dtype=torch.long), "edit_owner": torch.tensor(tr, dtype=torch.long),
        "edit_requests": torch.tensor([rows[k].request for k in edit], dtype=torch.long),
        "kl_rows": torch.tensor(kl_rows, dtype=torch.long), "kl_cols": torch.tensor(kl_cols, dtype=torch.long),
        "row_ids": torch.tensor([r.index for r in rows], dtype=torch.long),
    }


def kl_columns(row: Row) -> range:
    """The columns of a KL row whose next-token distributions must stay the base's: from the anchor's last token on."""
    return range(row.span[1] - 1, len(row.ids))


class StepBatches(Sampler):
    """Row indices of each step's batch, from the trainer's global step, rank and world size (see above)."""

    def __init__(self, n_rows: int, batch_size: int, trainer_of):
        self.n, self.B, self.trainer_of = n_rows, min(batch_size, n_rows), trainer_of

    def __len__(self) -> int:  # steps per epoch: every row seen once across the processes
        t = self.trainer_of()
        return math.ceil(self.n / (self.B * (t.world_size if t else 1)))

    def __iter__(self):
        t = self.trainer_of()
        step, world, rank = (t.global_step, t.world_size, t.global_rank) if t else (0, 1, 0)
        for s in range(step, step + len(self)):
            start = (s * world + rank) * self.B
            yield [(start + j) % self.n for j in range(self.B)]


class EditDataModule(L.LightningDataModule):
    """Rows of a list of edit requests (plus replayed earlier requests), batched by global step."""

    def __init__(self, tok, requests: list[EditRequest], prefixes: list[str], kl_templates: list[str],
                 batch_size: int = 64, seed: int = 0, kl_other_relations: int = 0, same_relation: int = 0):
        super().__init__()
        if not requests:
            raise DataError("no edit requests to train on")
        self.tok, self.batch_size = tok, batch_size
        self.rows = build_rows(tok, requests, prefixes, kl_templates, seed, kl_other_relations, same_relation)
        self.num_requests = len(requests)

    def train_dataloader(self) -> DataLoader:
        pad = self.tok.pad_token_id
        sampler = StepBatches(len(self.rows), self.batch_size, lambda: self.trainer)
        return DataLoader(self.rows, batch_sampler=sampler, collate_fn=lambda rs: collate(rs, pad))
