"""Which facts does the unedited model know? Two rules, both teacher-forced and batched:

- ``prefers_true``: the true target's mean token NLL after the request prompt is below the new target's
  (CounterFact's own notion: the model ranks the true answer above the counterfactual one). ``--known-only``
  keeps such records, so an edit really changes something the model believed.
- ``greedy``: the model's greedy next token is the true target's first token (ROME's causal trace traces only
  such facts: otherwise there is no probability to recover).

A record without a true target is never "known".
"""

from __future__ import annotations

from typing import Sequence

from memoe.batching import encode_pairs
from memoe.data.records import EditRecord, EditRequest
from memoe.errors import ConfigError
from memoe.evaluation.scoring import score_pairs

RULES = ("prefers_true", "greedy")


def known(model, tok, requests: Sequence[EditRequest], rule: str = "prefers_true", batch_size: int = 64) -> list[bool]:
    """For each request, whether the model knows its true target under ``rule``."""
    if rule not in RULES:
        raise ConfigError(f"unknown known-fact rule {rule!r}; choose one of {list(RULES)}")
    idx = [i for i, r in enumerate(requests) if r.target_true]
    out = [False] * len(requests)
    if not idx:
        return out
    prompts = [requests[i].text for i in idx]
    true = score_pairs(model, tok, prompts, [requests[i].target_true for i in idx], batch_size)
    if rule == "greedy":
        _, t_ids = encode_pairs(tok, prompts, [requests[i].target_true for i in idx])
        hits = [am[0] == ids[0] for am, ids in zip(true.argmax, t_ids)]
    else:
        new = score_pairs(model, tok, prompts, [requests[i].target_new for i in idx], batch_size)
        hits = [t < n for t, n in zip(true.nll, new.nll)]
    for i, hit in zip(idx, hits):
        out[i] = hit
    return out


def select_known(model, tok, records: Sequence[EditRecord], n: int | None = None, rule: str = "prefers_true",
                 batch_size: int = 64) -> tuple[list[EditRecord], dict]:
    """The first ``n`` records (all, if None) whose fact the model knows, scanning in order and stopping once
    enough are found; and ``{"rule", "tried", "kept"}`` for the result file."""
    kept: list[EditRecord] = []
    tried = 0
    step = max(64, 2 * (n or 0))
    while tried < len(records) and (n is None or len(kept) < n):
        chunk = records[tried : tried + step]
        kept += [r for r, k in zip(chunk, known(model, tok, [r.request for r in chunk], rule, batch_size)) if k]
        tried += len(chunk)
    if n is not None and len(kept) >= n:
        # Count only the records up to the n-th kept one as tried: the rest were never needed.
        last = kept[n - 1]
        tried = next(i for i, r in enumerate(records) if r is last) + 1
        kept = kept[:n]
    return kept, {"rule": rule, "tried": tried, "kept": len(kept)}
