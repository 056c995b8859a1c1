"""The ``memoe`` editor: MEMoE adapters trained with Lightning behind the common editor interface.

The first ``apply`` on a model creates a zero-initialised MEMoE adapter, attaches it and trains it on the
requests; later ``apply`` calls (sequential modes) keep training the same adapter, as does an edit of a model with
a saved MEMoE adapter attached (:class:`~memoe.editors.bypass.BypassEditor`). Earlier edits are protected
by a bounded replay buffer: the last ``replay`` requests are trained again beside each new batch, so the
adapter is never optimised on new edits alone (forgetting shows as the gap between "current" and "final").
``restore()`` puts the adapter's weights, anchors and buffer back as they were, and detaches an adapter the
edit created: the base model is never touched.
"""

from __future__ import annotations

import copy
import random
import weakref
from dataclasses import dataclass, field

from memoe.adapters.moe import MEMoEAdapter, MEMoEConfig
from memoe.config import bounds
from memoe.contexts import prefixed
from memoe.data.records import EditRequest
from memoe.editors.base import EditorConfig
from memoe.editors.bypass import BypassEditor
from memoe.training import TrainConfig, TrainerOptions, fit_adapter
from memoe.training.data import relation_templates


@dataclass
class MEMoEEditorConfig(EditorConfig):
    adapter: MEMoEConfig = field(default_factory=MEMoEConfig)
    """The adapter's shape (see :class:`memoe.adapters.moe.MEMoEConfig`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """How each batch of edits is learned (see :class:`memoe.training.TrainConfig`)."""
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    """Lightning Trainer options (see :class:`memoe.training.TrainerOptions`)."""
    replay: int = field(default=100, metadata=bounds(0))
    """Earlier requests trained again beside each new batch in sequential modes (0: none)."""


class MEMoEEditor(BypassEditor):
    name = "memoe"
    summary = "a mixture of experts beside one MLP, routed by knowledge anchor, trained with Lightning; a bypass adapter"
    paper = "Wang & Li 2024"
    Config = MEMoEEditorConfig
    Adapter = MEMoEAdapter

    def __init__(self, config=None):
        super().__init__(config)
        self._replay: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> requests to train again

    @classmethod
    def layer_override(cls, layers: list[int]) -> dict:
        return {"adapter": {"layers": list(layers)}}

    def new_adapter_config(self, model, tok) -> MEMoEConfig:
        return copy.deepcopy(self.config.adapter)

    def snapshot(self, adapter):
        return adapter.snapshot(), list(self._replay.get(adapter, []))

    def rewind(self, adapter, snap) -> None:
        adapter.rewind(snap[0])
        self._replay[adapter] = list(snap[1])

    def edit(self, model, tok, adapter: MEMoEAdapter, requests: list[EditRequest]) -> dict:
        cfg: MEMoEEditorConfig = self.config
        replay = self._replay.setdefault(adapter, [])
        adapter.add_anchors(tok, [r.subject for r in requests])
        with adapter.disabled():  # prefixes are the base model's text
            train = self.prefixes.apply(model, tok, cfg.train)
        self.add_keys(model, tok, adapter, requests, train)
        info = fit_adapter(model, tok, adapter, requests + replay[-cfg.replay :] if cfg.replay else requests, train, cfg.trainer)
        info.pop("trainer")
        info["time_split"] = {"training": round(info["seconds"], 3)}
        replay[:] = (replay + requests)[-cfg.replay :] if cfg.replay else []
        return info

    def add_keys(self, model, tok, adapter: MEMoEAdapter, requests: list[EditRequest], train: TrainConfig) -> None:
        """The relation gate's keys of ``requests`` (none without the gate): each prompt under the context prefixes
        and up to ``relation_templates`` other templates of its relation; then up to ``relation_negatives`` of its
        subject's other questions as negative keys. Templates are the batch's own, sampled with the seed."""
        a = self.config.adapter
        rng = random.Random(train.seed)
        fill = lambda templates, r: [t.replace("{}", r.subject) for t in templates]  # noqa: E731
        subjects = [r.subject for r in requests]
        adapter.add_facts(model, tok, subjects, [
            fill(prefixed(r.prompt, train.context_prefixes) + relation_templates(requests, i, a.relation_templates, rng, same=True), r)
            for i, r in enumerate(requests)])
        adapter.add_facts(model, tok, subjects, [
            fill(relation_templates(requests, i, a.relation_negatives, rng, same=False), r) for i, r in enumerate(requests)],
            negative=True)
