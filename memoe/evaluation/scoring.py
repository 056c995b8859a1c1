"""Batched teacher-forced scoring of (prompt, target) pairs: the one place every metric gets numbers from.

Prompts and targets go through the model in right-padded batches. Only the positions that predict target
tokens are sent through the LM head, so scoring stays cheap with a 128k vocabulary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn


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


def encode_pairs(tok, prompts: list[str], targets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (with the tokenizer's BOS) and of ``" " + target`` (no special tokens)."""
    p_ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
    t_ids = tok([" " + t for t in targets], add_special_tokens=False)["input_ids"]
    for t, ids in zip(targets, t_ids):
        if not ids:
            raise ValueError(f"target {t!r} tokenises to nothing")
    return p_ids, t_ids


def target_index(p_ids: list[list[int]], t_ids: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """Where each target token is predicted in the batch of ``prompt + target`` rows: (row, column, label)
    for every target token, flattened; position j predicts token j + 1."""
    rows = [b for b, t in enumerate(t_ids) for _ in t]
    cols = [len(p) - 1 + j for p, t in zip(p_ids, t_ids) for j in range(len(t))]
    labels = [x for t in t_ids for x in t]
    return rows, cols, labels


def pad_batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a (B, T) id tensor and its attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def warn_if_too_long(model: nn.Module, seqs: list[list[int]], what: str) -> None:
    """Warn when sequences exceed the model's positions: what a model computes past them is not meaningful."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    long = [len(s) for s in seqs if len(s) > limit]
    if long:
        warnings.warn(f"{len(long)} of {len(seqs)} {what} are longer than the model's {limit} positions (longest "
                      f"{max(long)} tokens): their scores and edits are not meaningful; shorten or filter them", stacklevel=3)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def final_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states after the final norm, without computing logits for every position."""
    return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


@torch.no_grad()
def score_pairs(model: nn.Module, tok, prompts: list[str], targets: list[str], batch_size: int = 64) -> PairScores:
    """Teacher-forced scores of ``target`` after ``prompt`` for each pair, in padded batches."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    out = PairScores([], [], [], [])
    if not prompts:
        return out
    p_ids, t_ids = encode_pairs(tok, prompts, targets)
    warn_if_too_long(model, [p + t for p, t in zip(p_ids, t_ids)], "scored prompts (with their targets)")
    device, head = model_device(model), model.get_output_embeddings()
    # Longest first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -(len(p_ids[i]) + len(t_ids[i])))
    results: dict[int, tuple] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [p_ids[i] + t_ids[i] for i in idx]
        ids, mask = pad_batch(seqs, tok.pad_token_id, device)
        hidden = final_hidden(model, ids, mask)  # (B, T, H)
        rows, cols, labels = target_index([p_ids[i] for i in idx], [t_ids[i] for i in idx])
        logits = head(hidden[rows, cols]).float()  # (sum of target lengths, V)
        logp = torch.log_softmax(logits, dim=-1)
        labels_t = torch.tensor(labels, device=device)
        tok_nll = -logp.gather(1, labels_t[:, None])[:, 0]
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


def target_nll(model: nn.Module, tok, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """(B,) differentiable mean token NLL of each target after its prompt, in one padded forward.

    The training-side twin of :func:`score_pairs`: editors optimise it (FT, target values, adapters).
    """
    p_ids, t_ids = encode_pairs(tok, prompts, targets)
    warn_if_too_long(model, [p + t for p, t in zip(p_ids, t_ids)], "edit prompts (with their targets)")
    device, head = model_device(model), model.get_output_embeddings()
    ids, mask = pad_batch([p + t for p, t in zip(p_ids, t_ids)], tok.pad_token_id, device)
    hidden = final_hidden(model, ids, mask)
    rows, cols, labels = target_index(p_ids, t_ids)
    labels = torch.tensor(labels, device=device)
    tok_nll = torch.nn.functional.cross_entropy(head(hidden[rows, cols]).float(), labels, reduction="none")
    seg = torch.tensor(rows, device=device)
    counts = torch.bincount(seg, minlength=len(t_ids)).float()
    return torch.zeros(len(t_ids), device=device).index_add(0, seg, tok_nll) / counts
