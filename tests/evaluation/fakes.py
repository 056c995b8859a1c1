"""A language model whose probabilities the test sets by hand: P(next | current word) = table[current]."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.padding_side = "right"
    return tok


class _Base(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=nn.functional.one_hot(input_ids, self.vocab).float())


class BigramLM(nn.Module):
    """``set(current, {next: prob})`` fixes the next-word distribution after ``current``; the rest of the
    probability mass is spread evenly over the other words."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.V = len(tok)
        self.base_model = _Base(self.V)
        self.head = nn.Linear(self.V, self.V, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
        self.config = SimpleNamespace(model_type="bigram")

    def set(self, current: str, probs: dict[str, float]) -> None:
        c = self.tok.convert_tokens_to_ids(current)
        rest = (1.0 - sum(probs.values())) / (self.V - len(probs))
        row = torch.full((self.V,), math.log(rest))
        for w, p in probs.items():
            row[self.tok.convert_tokens_to_ids(w)] = math.log(p)
        with torch.no_grad():
            self.head.weight[:, c] = row

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.base_model(input_ids).last_hidden_state))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, stopping_criteria=None, pad_token_id=0, **kw):
        """Greedy decoding of the bigram table (left padding is harmless: only the last token matters); rows the
        stopping criteria call done get ``pad_token_id`` from then on, as in transformers."""
        ids, done = input_ids, torch.zeros(len(input_ids), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = self.forward(ids[:, -1:]).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            if stopping_criteria is not None:
                done = done | stopping_criteria[0](ids, None)
            if done.all():
                break
        return ids
