"""Knowledge anchors: the named entities a bypass adapter was trained on, found again in token ids.

MEMoE routes every token by its *knowledge anchor*, the entity the input is about. During training the
anchor is the request's subject span (given); at inference a detector finds it:

- :class:`AnchorTrie`: an exact token-level matcher over the anchors the adapter was trained on plus any
  user-supplied entity list. Each anchor is stored in the two spellings a BPE produces (sentence-initial and
  after a space). A match must cover whole words: ``Kalo Mira`` is not found in ``Kalo Mirabel``.
- :class:`EntityDetector`: an optional plug-in that asks a named-entity recogniser (any callable with the
  Hugging Face ``pipeline("ner", aggregation_strategy="simple")`` output format) for entity character spans.

Every detector returns, per row, the ``[start, end)`` token spans of the anchors it found; the bypass turns
them into, for each position, the index of the last token of the most recent anchor (:func:`anchor_positions`).
"""

from __future__ import annotations

from typing import Callable

import torch

from memoe.errors import DataError


def word_flags(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (V,) bool tensors over the vocabulary: the token glues onto the previous word (no leading space
    marker, starts with a letter or digit), and the token is a special token. They decide word boundaries
    without the tokenizer, so a saved adapter can match anchors on its own."""
    vocab = len(tok)
    pieces = tok.convert_ids_to_tokens(list(range(vocab)))
    texts = tok.batch_decode([[i] for i in range(vocab)])
    # A space marker (byte-level "Ġ", sentencepiece "▁") or a non-alphanumeric first character starts a word.
    joins = torch.tensor([bool(p) and p[0] not in "Ġ▁" and t[:1].isalnum() for p, t in zip(pieces, texts)], dtype=torch.bool)
    special = torch.zeros(vocab, dtype=torch.bool)
    special[[i for i in tok.all_special_ids if i < vocab]] = True
    return joins, special


class AnchorTrie:
    """Exact whole-word matching of anchor token sequences (longest match wins at each start)."""

    def __init__(self, joins: torch.Tensor, special: torch.Tensor):
        self.joins = joins.bool().cpu()
        self.special = special.bool().cpu()
        self.root: dict = {}
        self.sequences: list[list[int]] = []
        self.texts: list[str] = []

    @classmethod
    def for_tokenizer(cls, tok) -> "AnchorTrie":
        return cls(*word_flags(tok))

    def __len__(self) -> int:
        return len(self.texts)

    def add_ids(self, ids: list[int]) -> None:
        if not ids:
            raise DataError("an anchor must have at least one token")
        node = self.root
        for t in ids:
            node = node.setdefault(int(t), {})
        if None not in node:
            node[None] = True
            self.sequences.append([int(t) for t in ids])

    def add(self, tok, text: str) -> None:
        """Add an entity, in its sentence-initial and mid-sentence spellings."""
        text = text.strip()
        if not text:
            raise DataError("empty anchor text")
        if text in self.texts:
            return
        self.texts.append(text)
        for spelling in (text, " " + text):
            self.add_ids(tok(spelling, add_special_tokens=False)["input_ids"])

    def _joined(self, t: int) -> bool:
        return 0 <= t < len(self.joins) and bool(self.joins[t])

    def _special(self, t: int) -> bool:
        return 0 <= t < len(self.special) and bool(self.special[t])

    def find(self, ids: list[int]) -> list[tuple[int, int]]:
        """Non-overlapping ``[start, end)`` spans of anchors in one row of token ids, left to right."""
        spans, i, n = [], 0, len(ids)
        while i < n:
            # A match may not begin inside a word (a glued token right after another word token).
            if i > 0 and self._joined(ids[i]) and not self._special(ids[i - 1]):
                i += 1
                continue
            node, best = self.root, None
            for j in range(i, n):
                node = node.get(ids[j])
                if node is None:
                    break
                if None in node and not (j + 1 < n and self._joined(ids[j + 1])):  # may not end inside a word
                    best = j + 1
            if best is None:
                i += 1
            else:
                spans.append((i, best))
                i = best
        return spans

    def state(self) -> dict:
        """JSON-able contents (texts and token sequences) for ``adapter_config.json``."""
        return {"texts": list(self.texts), "sequences": [list(s) for s in self.sequences]}

    def load_state(self, state: dict) -> None:
        for s in state.get("sequences", []):
            self.add_ids(s)
        self.texts = list(dict.fromkeys(self.texts + list(state.get("texts", []))))


class EntityDetector:
    """Anchors from a named-entity recogniser (optional plug-in; needs the tokenizer to map characters).

    ``ner`` is any callable ``text -> [{"start": int, "end": int, ...}]``, e.g. a Hugging Face
    ``pipeline("ner", model=<local path>, aggregation_strategy="simple")``.
    """

    def __init__(self, tok, ner: Callable[[str], list[dict]]):
        self.tok, self.ner = tok, ner

    def find(self, ids: list[int]) -> list[tuple[int, int]]:
        pieces = [self.tok.decode([t]) for t in ids]
        starts, pos = [], 0
        for p in pieces:
            starts.append(pos)
            pos += len(p)
        text = "".join(pieces)
        spans = []
        for ent in self.ner(text):
            first = next((k for k, s in enumerate(starts) if s + len(pieces[k]) > ent["start"]), None)
            last = next((k for k in range(len(pieces) - 1, -1, -1) if starts[k] < ent["end"]), None)
            if first is not None and last is not None and last >= first:
                spans.append((first, last + 1))
        return sorted(spans)


def anchor_positions(spans: list[list[tuple[int, int]]], length: int, device=None) -> torch.Tensor:
    """(B, T) for each position the index of the last token of the latest anchor that *ends at or before*
    it (-1 where none has yet). Causal: a token is never routed by an entity that comes after it."""
    out = torch.full((len(spans), length), -1, dtype=torch.long)
    for b, row in enumerate(spans):
        for _start, end in sorted(row):
            if end - 1 < length:
                out[b, end - 1 :] = end - 1
    return out.to(device) if device is not None else out
