"""Answers as a user sees them: greedy decoding, and the protocol of generation-based metrics.

The protocol is that of "The Mirage of Model Editing" (Yang et al. 2025; WanliYoung/Revisit-Editing-Evaluation):
greedy decoding of at most 50 new tokens, stopping at ".", a newline or the end of sequence; a generation *hits* a
target when its normalised text (lower case, articles and punctuation stripped, whitespace collapsed) begins with
the normalised target. Prompts are decoded in left-padded batches with a KV cache (``model.generate``), never one
at a time; the answer is cut at the first stop, so a batch that runs on for a longer row changes no answer.
"""

from __future__ import annotations

import re
import string

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from memoe.batching import cache_keyword, cache_of, in_context, model_device

STOPS = (".", "\n")
#: What a result file says about how answers were generated and compared.
PROTOCOL = {"decoding": "greedy", "max_new_tokens": 50, "stop": [".", "newline", "end of sequence"],
            "hit": "normalised generation begins with the normalised target",
            "normalise": "lower case; punctuation and the articles a/an/the removed; whitespace collapsed",
            "chat_template": None, "batched": "left padding, KV cache"}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's answer normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def answer(generation: str) -> str:
    """The generation up to its first stop ("." or a newline)."""
    cut = min((i for i in (generation.find(s) for s in STOPS) if i >= 0), default=len(generation))
    return generation[:cut]


def hits(generation: str, target: str) -> bool:
    """Whether the answer in ``generation`` begins with ``target`` (both normalised); an empty target never hits."""
    t = normalise(target)
    return bool(t) and normalise(answer(generation)).startswith(t)


def same_answer(a: str, b: str) -> bool:
    """Two generations give the same answer (normalised), as locality by generation compares them."""
    return normalise(answer(a)) == normalise(answer(b))


def _stop_ids(tok) -> torch.Tensor:
    """Ids of the tokens whose text holds a stop: after one of them a row's answer is complete."""
    cached = getattr(tok, "_memoe_stop_ids", None)
    if cached is None:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        ends = [tok.eos_token_id] if tok.eos_token_id is not None else []
        cached = torch.tensor([i for i, t in enumerate(texts) if any(s in t for s in STOPS)] + ends, dtype=torch.long)
        tok._memoe_stop_ids = cached
    return cached


class _AnswerComplete(StoppingCriteria):
    """Per row: done once a new token holds a stop (or is the end of sequence)."""

    def __init__(self, stop_ids: torch.Tensor, start: int):
        self.stop_ids, self.start = stop_ids, start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start:]  # (B, new tokens so far)
        return torch.isin(new, self.stop_ids.to(new.device)).any(1)


@torch.no_grad()
def _greedy_pruned(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_ids: torch.Tensor) -> list[list[int]]:
    """Greedy decoding of a left-padded batch with a KV cache, dropping every row from the batch (and the cache) once it
    has produced a stop token. ``model.generate`` keeps finished rows until the last one is done: with answers of a
    few tokens beside a rambling one, most of its work is thrown away."""
    stop_ids, kw = stop_ids.to(ids.device), cache_keyword(model)
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T): positions as transformers gives left-padded rows
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, nxt, last = cache_of(out), out.logits[:, -1].argmax(-1), pos[:, -1]  # (B,), (B,)
    rows, new = torch.arange(len(ids)), [[] for _ in range(len(ids))]
    for step in range(max_new_tokens):
        for r, t in zip(rows.tolist(), nxt.tolist()):
            new[r].append(t)
        live = ~torch.isin(nxt, stop_ids)  # (B',)
        if step == max_new_tokens - 1 or not live.any():
            break
        if not live.all():
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep.to(ids.device))
            rows, nxt, last, mask = rows[keep.cpu()], nxt[keep], last[keep], mask[keep]
        mask, last = torch.cat([mask, mask.new_ones(len(mask), 1)], 1), last + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    logits_to_keep=1, **{kw: cache})
        cache, nxt = cache_of(out), out.logits[:, -1].argmax(-1)
    return new


def _greedy_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_ids: torch.Tensor, pad: int) -> list[list[int]]:
    """Greedy decoding with the model's own ``generate`` (a model outside transformers, such as a test double)."""
    start = ids.shape[1]
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         stopping_criteria=StoppingCriteriaList([_AnswerComplete(stop_ids, start)]))
    return gen[:, start:].tolist()


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 50, batch_size: int = 32) -> list[str]:
    """The greedy continuation of each prompt up to its first stop, decoded (without the prompt). Prompts of similar
    length are batched together (left padding, so every row's next token is at the same position)."""
    if not prompts:
        return []
    prompts = in_context(model, prompts)  # an in-context editor's retrieved edits first
    stop_ids = _stop_ids(tok)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, str] = {}
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        starts = range(0, len(order), batch_size)  # a bar where it takes a while: the pre-edit pass over many records
        for s in tqdm(starts, desc="generating answers", unit="batch", leave=False, disable=len(starts) < 4 or None):
            idx = order[s : s + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model_device(model))
            args = (model, enc["input_ids"], enc["attention_mask"], max_new_tokens, stop_ids)
            new = _greedy_pruned(*args) if isinstance(model, PreTrainedModel) else _greedy_generate(*args, tok.pad_token_id)
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                out[i] = answer(text)
    finally:
        tok.padding_side = side
    return [out[i] for i in range(len(prompts))]


__all__ = ["PROTOCOL", "answer", "greedy_answers", "hits", "normalise", "same_answer"]
