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
from transformers import StoppingCriteria, StoppingCriteriaList

from memoe.batching import in_context, model_device

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
            start = enc["input_ids"].shape[1]
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 stopping_criteria=StoppingCriteriaList([_AnswerComplete(stop_ids, start)]))
            for i, text in zip(idx, tok.batch_decode(gen[:, start:], skip_special_tokens=True)):
                out[i] = answer(text)
    finally:
        tok.padding_side = side
    return [out[i] for i in range(len(prompts))]


__all__ = ["PROTOCOL", "answer", "greedy_answers", "hits", "normalise", "same_answer"]
