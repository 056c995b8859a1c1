"""Pretraining text and recall probes for a knowledge testbed, built from an edit dataset's *true* facts."""

from __future__ import annotations

import random
from typing import Protocol

from memoe.data.records import EditDataset, LabeledPrompt
from memoe.data.synthetic import PREFIXES, World


class FactCorpus(Protocol):
    """What the testbed trainer needs from a dataset."""

    def sentences(self, rng: random.Random) -> list[str]:
        """One epoch of pretraining sentences (augmentation drawn from ``rng``)."""

    def probes(self) -> dict[str, list[LabeledPrompt]]:
        """Named sets of (prompt, true answer) pairs for the report card; ``requests`` first."""

    def trace_facts(self, n: int) -> list[tuple[str, str, str]]:
        """Up to ``n`` (prompt text, subject, true target) triples for the causal trace."""


def _dedupe(pairs: list[LabeledPrompt]) -> list[LabeledPrompt]:
    seen: dict[str, LabeledPrompt] = {}
    for p in pairs:
        seen.setdefault(p.prompt, p)  # a prompt keeps its first answer; datasets agree where they overlap
    return list(seen.values())


class RecordCorpus:
    """Any :class:`EditDataset` (CounterFact, zsRE, a user's file): every prompt with its true answer.

    The request, its paraphrases and neighbours are answered with ``target_true``; attribute prompts (other
    subjects whose true answer is the new target) with ``target_new``; locality and same-subject prompts with
    their own answers. All of them are trained on, so paraphrase recall measures memorisation here; the
    synthetic world is where generalisation to unseen phrasings is measured.
    """

    def __init__(self, dataset: EditDataset, prefix_prob: float = 0.2):
        self.dataset, self.prefix_prob = dataset, prefix_prob
        req, para, neigh, attr, loc = [], [], [], [], []
        for rec in dataset:
            r = rec.request
            req.append(LabeledPrompt(r.text, r.target_true))
            para += [LabeledPrompt(p, r.target_true) for p in rec.paraphrase_prompts]
            neigh += [LabeledPrompt(p, r.target_true) for p in rec.neighborhood_prompts]
            attr += [LabeledPrompt(p, r.target_new) for p in rec.attribute_prompts]
            loc += list(rec.locality_prompts) + list(rec.same_subject_prompts)
        self._probes = {"requests": req, "paraphrases": para, "neighbourhood": neigh, "attributes": attr, "locality": loc}
        self._probes = {k: v for k, v in self._probes.items() if v}
        self._all = _dedupe([p for v in self._probes.values() for p in v])

    def sentences(self, rng: random.Random) -> list[str]:
        lines = []
        for p in self._all:
            line = f"{p.prompt} {p.target}."
            if rng.random() < self.prefix_prob:
                line = f"{rng.choice(PREFIXES)} {line}"
            lines.append(line)
        rng.shuffle(lines)
        return lines

    def probes(self) -> dict[str, list[LabeledPrompt]]:
        return self._probes

    def trace_facts(self, n: int) -> list[tuple[str, str, str]]:
        return [(r.request.text, r.request.subject, r.request.target_true) for r in self.dataset.records[:n]]


class WorldCorpus:
    """The synthetic world: each fact under all but one of its relation's phrasings, plus profile lines.

    ``heldout`` probes each fact under the phrasing pretraining never showed *for that fact* (other facts of
    the relation use it): recall there is the sign of per-subject storage.
    """

    def __init__(self, world: World, prefix_prob: float = 0.2):
        self.world, self.prefix_prob = world, prefix_prob
        ds = world.dataset
        self._probes = {
            "requests": [LabeledPrompt(r.request.text, r.request.target_true) for r in ds],
            "heldout": world.heldout_prompts(),
            "paraphrases": [LabeledPrompt(r.paraphrase_prompts[1], r.request.target_true) for r in ds],
            "neighbourhood": _dedupe([LabeledPrompt(p, r.request.target_true) for r in ds for p in r.neighborhood_prompts]),
        }
        self._probes = {k: v for k, v in self._probes.items() if v}

    def sentences(self, rng: random.Random) -> list[str]:
        return self.world.training_sentences(rng, self.prefix_prob)

    def probes(self) -> dict[str, list[LabeledPrompt]]:
        return self._probes

    def trace_facts(self, n: int) -> list[tuple[str, str, str]]:
        return [(r.request.text, r.request.subject, r.request.target_true) for r in self.world.dataset.records[:n]]
