"""Batched teacher-forced scoring of (prompt, target) pairs: the one place every metric gets numbers from.

Prompts and targets go through the model in right-padded batches (:mod:`memoe.batching`). Only the positions
that predict target tokens are sent through the LM head, so scoring stays cheap with a 128k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from memoe.batching import encode_pairs, final_hidden, in_context, model_device, pad_batch, target_index, warn_if_too_long


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
    """Teacher-forced scores of ``target`` after ``prompt`` for each pair, in padded batches."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    out = PairScores([], [], [], [])
    if not prompts:
        return out
    p_ids, t_ids = encode_pairs(tok, in_context(model, prompts), targets)  # an in-context editor's retrieved edits first
    warn_if_too_long(model, [p + t for p, t in zip(p_ids, t_ids)], "scored prompts (with their targets)")
    device, head = model_device(model), model.get_output_embeddings()
    # Longest first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -(len(p_ids[i]) + len(t_ids[i])))
    results: dict[int, tuple] = {}
    starts = range(0, len(order), batch_size)  # a bar where it takes a while: the pre-edit pass over many records
    for start in tqdm(starts, desc="scoring", unit="batch", leave=False, disable=len(starts) < 4 or None):
        idx = order[start : start + batch_size]
        seqs = [p_ids[i] + t_ids[i] for i in idx]
        ids, mask = pad_batch(seqs, tok.pad_token_id, device)
        hidden = final_hidden(model, ids, mask)  # (B, T, H)
        rows, cols, labels = target_index([p_ids[i] for i in idx], [t_ids[i] for i in idx])
        logits = head(hidden[rows, cols]).float()  # (sum of target lengths, V)
        labels_t = torch.tensor(labels, device=device)
        tok_nll = F.cross_entropy(logits, labels_t, reduction="none")  # (sum of target lengths,)
        hit = logits.argmax(-1)
        offset = 0
        for i in idx:
            n_t = len(t_ids[i])
            seg = slice(offset, offset + n_t)
            results[i] = (
                tok_nll[seg].mean().item(),
                (hit[seg] == labels_t[seg]).float().mean().item(),
                hit[seg].tolist(),
                tok_nll[offset].neg().exp().item(),
            )
            offset += n_t
    for i in range(len(prompts)):
        nll, acc, am, fp = results[i]
        out.nll.append(nll)
        out.token_acc.append(acc)
        out.argmax.append(am)
        out.first_prob.append(fp)
    return out

