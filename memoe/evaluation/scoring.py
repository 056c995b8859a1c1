"""Batched teacher-forced scoring of (prompt, target) pairs: the one place every metric gets numbers from.

Prompts and targets go through the model in right-padded batches (:mod:`memoe.batching`). Only the positions
that predict target tokens are sent through the LM head, so scoring stays cheap with a 128k vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from memoe.batching import encode_pairs, final_hidden, in_context, model_device, pad_batch, warn_if_too_long


@dataclass
class PairScores:
    """Per-pair results, each a list aligned with the input pairs."""

    nll: list[float]
    """Mean token negative log-likelihood of the whole target string (ROME/MEMIT's probability)."""
    token_acc: list[float]
    """Fraction of target tokens that are the argmax under teacher forcing (zsRE accuracy)."""
    argmax: list[list[int]]
    """The argmax token at each target position (EasyEdit locality compares these)."""
    first_prob: list[float]
    """Probability of the target's first token."""

    @property
    def exact(self) -> list[bool]:
        """Every target token is the argmax: the model would greedily produce the target."""
        return [a >= 1.0 for a in self.token_acc]


@torch.no_grad()
def score_pairs(model: nn.Module, tok, prompts: list[str], targets: list[str], batch_size: int = 64) -> PairScores:
    """Teacher-forced scores of ``target`` after ``prompt`` for each pair, in padded batches.

    Pairs share rows where they can: a one-token target is read at its prompt's last position, in any row that
    starts with that prompt, so a prompt scored against both of its targets (new and true, which are one token
    for most of CounterFact) costs one row, not two; identical pairs cost nothing more."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    out = PairScores([], [], [], [])
    if not prompts:
        return out
    p_ids, t_ids = encode_pairs(tok, in_context(model, prompts), targets)  # an in-context editor's retrieved edits first
    warn_if_too_long(model, [p + t for p, t in zip(p_ids, t_ids)], "scored prompts (with their targets)")
    device, head = model_device(model), model.get_output_embeddings()
    # Rows: prompt + target for every distinct multi-token pair, then the bare prompt where no row starts with it yet.
    rows: list[list[int]] = []
    row_of: dict[tuple, int] = {}  # (prompt, target) or (prompt, None) -> row
    prompt_row: dict[tuple, int] = {}  # prompt -> any row that starts with it
    for p, t in sorted(zip(p_ids, t_ids), key=lambda pt: len(pt[1]) == 1):  # multi-token targets first
        key = (tuple(p), tuple(t) if len(t) > 1 else None)
        if key in row_of:
            continue
        if key[1] is None and key[0] in prompt_row:
            row_of[key] = prompt_row[key[0]]
            continue
        row_of[key] = len(rows)
        rows.append(p + t if len(t) > 1 else list(p))
        prompt_row.setdefault(key[0], row_of[key])
    # Reads: (row, column, label) for each pair's target tokens; position j predicts token j + 1.
    reads = {}  # row -> list of (pair, column, label)
    for i, (p, t) in enumerate(zip(p_ids, t_ids)):
        r = row_of[(tuple(p), tuple(t) if len(t) > 1 else None)]
        reads.setdefault(r, []).extend((i, len(p) - 1 + j, x) for j, x in enumerate(t))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))  # longest first: less padding per batch
    tok_nll: list[list[float]] = [[] for _ in prompts]
    tok_hit: list[list[int]] = [[] for _ in prompts]
    tok_ok: list[list[bool]] = [[] for _ in prompts]
    starts = range(0, len(order), batch_size)  # a bar where it takes a while: the pre-edit pass over many records
    for start in tqdm(starts, desc="scoring", unit="batch", leave=False, disable=len(starts) < 4 or None):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([rows[r] for r in idx], tok.pad_token_id, device)
        hidden = final_hidden(model, ids, mask)  # (B, T, H)
        batch_reads = [(b, *read) for b, r in enumerate(idx) for read in reads[r]]
        b_rows = [b for b, *_ in batch_reads]
        b_cols = [c for _, _, c, _ in batch_reads]
        labels = torch.tensor([x for *_, x in batch_reads], device=device)
        logits = head(hidden[b_rows, b_cols]).float()  # (reads, V)
        nll = F.cross_entropy(logits, labels, reduction="none").tolist()
        hit = logits.argmax(-1)
        ok = (hit == labels).tolist()
        for (_, i, _, _), n, h, o in zip(batch_reads, nll, hit.tolist(), ok):
            tok_nll[i].append(n)
            tok_hit[i].append(h)
            tok_ok[i].append(o)
    for i in range(len(prompts)):
        out.nll.append(sum(tok_nll[i]) / len(tok_nll[i]))
        out.token_acc.append(sum(tok_ok[i]) / len(tok_ok[i]))
        out.argmax.append(tok_hit[i])
        out.first_prob.append(math.exp(-tok_nll[i][0]))
    return out

