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


def word_flags(tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three (V,) bool tensors over the vocabulary: the token glues onto the previous word (no leading space
    marker, starts with a letter or digit), the token is a special token, and the token ends a sentence (its text
    ends in ".", "!" or "?", or holds a line break). They decide word and sentence boundaries without the
    tokenizer, so a saved adapter can match anchors on its own."""
    vocab = len(tok)
    pieces = tok.convert_ids_to_tokens(list(range(vocab)))
    texts = tok.batch_decode([[i] for i in range(vocab)])
    # A space marker (byte-level "Ġ", sentencepiece "▁") or a non-alphanumeric first character starts a word.
    joins = torch.tensor([bool(p) and p[0] not in "Ġ▁" and t[:1].isalnum() for p, t in zip(pieces, texts)], dtype=torch.bool)
    special = torch.zeros(vocab, dtype=torch.bool)
    special[[i for i in tok.all_special_ids if i < vocab]] = True
    stops = torch.tensor([t.rstrip(" ").endswith((".", "!", "?")) or "\n" in t for t in texts], dtype=torch.bool)
    return joins, special, stops


class AnchorTrie:
    """Exact whole-word matching of anchor token sequences (longest match wins at each start)."""

    def __init__(self, joins: torch.Tensor, special: torch.Tensor, stops: torch.Tensor | None = None):
        self.joins = joins.bool().cpu()
        self.special = special.bool().cpu()
        self.stops = stops.bool().cpu() if stops is not None else None  # None: an adapter saved before sentence ends
        self.root: dict = {}
        self.sequences: list[list[int]] = []
        self.owners: list[int] = []  # per sequence, the index in ``texts`` of its entity (-1: unknown)
        self.texts: list[str] = []

    @classmethod
    def for_tokenizer(cls, tok) -> "AnchorTrie":
        return cls(*word_flags(tok))

    def __len__(self) -> int:
        return len(self.texts)

    def add_ids(self, ids: list[int], owner: int = -1) -> None:
        """Add one token sequence; ``owner`` is the index in ``texts`` of the entity it spells (-1: unknown)."""
        if not ids:
            raise DataError("an anchor must have at least one token")
        node = self.root
        for t in ids:
            node = node.setdefault(int(t), {})
        if None not in node:
            node[None] = owner
            self.sequences.append([int(t) for t in ids])
            self.owners.append(owner)

    def add(self, tok, text: str) -> None:
        """Add an entity, in its sentence-initial and mid-sentence spellings."""
        text = text.strip()
        if not text:
            raise DataError("empty anchor text")
        if text in self.texts:
            return
        self.texts.append(text)
        for spelling in (text, " " + text):
            self.add_ids(tok(spelling, add_special_tokens=False)["input_ids"], len(self.texts) - 1)

    def owner(self, text: str) -> int:
        """The anchor id of entity ``text`` (its index in ``texts``), -1 if it is not an anchor."""
        text = text.strip()
        return self.texts.index(text) if text in self.texts else -1

    def owner_of(self, ids: list[int]) -> int:
        """The anchor id of the entity that token sequence ``ids`` spells exactly (-1: none)."""
        node = self.root
        for t in ids:
            node = node.get(int(t))
            if node is None:
                return -1
        return node.get(None, -1)

    def sentence_ends(self, ids: list[int]) -> list[int]:
        """Positions in ``ids`` of tokens that end a sentence (none if the adapter predates the flags)."""
        if self.stops is None:
            return []
        return [i for i, t in enumerate(ids) if 0 <= t < len(self.stops) and bool(self.stops[t])]

    def _joined(self, t: int) -> bool:
        return 0 <= t < len(self.joins) and bool(self.joins[t])

    def _special(self, t: int) -> bool:
        return 0 <= t < len(self.special) and bool(self.special[t])

    def find(self, ids: list[int]) -> list[tuple[int, int]]:
        """Non-overlapping ``[start, end)`` spans of anchors in one row of token ids, left to right."""
        return [(s, e) for s, e, _ in self.find_owned(ids)]

    def find_owned(self, ids: list[int]) -> list[tuple[int, int, int]]:
        """:meth:`find`'s spans, each with the anchor id of the entity it spells (-1: unknown)."""
        spans, i, n = [], 0, len(ids)
        while i < n:
            # A match may not begin inside a word (a glued token right after another word token).
            if i > 0 and self._joined(ids[i]) and not self._special(ids[i - 1]):
                i += 1
                continue
            node, best, owner = self.root, None, -1
            for j in range(i, n):
                node = node.get(ids[j])
                if node is None:
                    break
                if None in node and not (j + 1 < n and self._joined(ids[j + 1])):  # may not end inside a word
                    best, owner = j + 1, node[None]
            if best is None:
                i += 1
            else:
                spans.append((i, best, owner))
                i = best
        return spans

    def state(self) -> dict:
        """JSON-able contents (texts and token sequences) for ``adapter_config.json``."""
        return {"texts": list(self.texts), "sequences": [list(s) for s in self.sequences], "owners": list(self.owners)}

    def load_state(self, state: dict) -> None:
        """Add the anchors of :meth:`state` (into an empty trie: the anchor ids stay those of the saved one)."""
        seqs = state.get("sequences", [])
        for s, o in zip(seqs, state.get("owners") or [-1] * len(seqs)):  # adapters saved before anchor ids: -1
            self.add_ids(s, o)
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


def anchor_positions(spans: list[list[tuple[int, int]]], length: int, device=None,
                     owners: list[list[int]] | None = None,
                     ends: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, T) tensors: for each position the index of the last token of the latest anchor that *ends at or
    before* it, and that anchor's id (``owners``, per row one per span; -1 when unknown); -1 where none has yet.
    Causal: a token is never routed by an entity that comes after it. With ``ends`` (per row, positions of
    sentence-ending tokens), an anchor reaches only to the end of its sentence: the tokens after the first sentence
    end that follows it have none, until the next anchor."""
    pos = torch.full((len(spans), length), -1, dtype=torch.long)
    ids = torch.full((len(spans), length), -1, dtype=torch.long)
    here = torch.arange(length)
    for b, row in enumerate(spans):
        row_owners = owners[b] if owners is not None else [-1] * len(row)
        for (_start, end), owner in sorted(zip(row, row_owners)):
            if end - 1 < length:
                pos[b, end - 1 :] = end - 1
                ids[b, end - 1 :] = owner
        if ends is not None:
            for e in ends[b]:  # the tokens after a sentence end lose an anchor that ended before it
                cut = (here > e) & (pos[b] >= 0) & (pos[b] < e)
                pos[b, cut], ids[b, cut] = -1, -1
    return (pos.to(device), ids.to(device)) if device is not None else (pos, ids)
