"""The ``memoe`` editor: MEMoE adapters trained with Lightning behind the common editor interface.

The first ``apply`` on a model creates a zero-initialised MEMoE adapter, attaches it and trains it on the
requests; later ``apply`` calls (sequential modes) keep training the same adapter. Earlier edits are protected
by a bounded replay buffer: the last ``replay`` requests are trained again beside each new batch, so the
adapter is never optimised on new edits alone (forgetting shows as the gap between "current" and "final").
``restore()`` puts the adapter's weights, anchors and buffer back as they were, and detaches an adapter the
edit created: the base model is never touched.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

from memoe.adapters.bypass import attached
from memoe.adapters.moe import MEMoEAdapter, MEMoEConfig
from memoe.config import bounds
from memoe.data.records import EditRequest
from memoe.editors.base import Editor, EditorConfig, EditResult
from memoe.training import TrainConfig, TrainerOptions, fit_adapter


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


class MEMoEEditor(Editor):
    name = "memoe"
    Config = MEMoEEditorConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._adapters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (adapter, replay list)

    @classmethod
    def layer_override(cls, layers: list[int]) -> dict:
        return {"adapter": {"layers": list(layers)}}

    def adapter(self, model) -> MEMoEAdapter | None:
        """The adapter this editor has attached to ``model`` (None before the first edit or after restore)."""
        entry = self._adapters.get(model)
        return entry[0] if entry and entry[0] in attached(model) else None

    def _apply(self, model, tok, requests: list[EditRequest]) -> EditResult:
        cfg: MEMoEEditorConfig = self.config
        train = self.prefixes.apply(model, tok, cfg.train)  # before the first attach: the base writes them
        adapter = self.adapter(model)
        created = adapter is None
        if created:
            adapter = MEMoEAdapter.create(model, tok, copy.deepcopy(cfg.adapter)).attach(model)
            self._adapters[model] = (adapter, [])
        replay = self._adapters[model][1]
        before = ({k: v.clone() for k, v in adapter.state_dict().items()}, copy.deepcopy(adapter.trie), list(replay))
        adapter.add_anchors(tok, [r.subject for r in requests])
        info = fit_adapter(model, tok, adapter, requests + replay[-cfg.replay :] if cfg.replay else requests,
                           train, cfg.trainer)
        info.pop("trainer")
        replay[:] = (replay + requests)[-cfg.replay :] if cfg.replay else []

        def undo():
            if created:
                adapter.detach()
                self._adapters.pop(model, None)
                return
            adapter.load_state_dict(before[0])
            adapter.trie = before[1]
            replay[:] = before[2]

        return EditResult(editor=self.name, requests=list(requests), modules=[adapter], info=info, _undo=[undo])
