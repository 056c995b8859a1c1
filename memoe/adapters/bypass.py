"""Bypass adapters: modules beside a frozen model's layers, attached with hooks, saved as safetensors.

A bypass adapter (MEMoE, CoachHooK) never touches the base weights. It holds one :class:`BypassLayer` per
edited layer; attaching registers a forward hook on each wrapped module (the MLP, or its down-projection)
that turns the module's output ``out`` into ``layer(x, out, ctx)``, where ``x`` is the module's input.
Hooks rather than module replacement keep the base model's module tree, parameter names and
``state_dict`` exactly as they were, so closed-form editors, ``save_pretrained`` and a second adapter see the
untouched base; ``detach`` removes the hooks and gives the original model back bit for bit.

Routing by knowledge anchor needs the token ids, which a layer does not see: a pre-hook on the base model
finds the anchors once per forward (or takes them from :meth:`BypassAdapter.given_anchors` in training) and
shares them with the layers through a :class:`RoutingContext`. During cached generation the context keeps
the ids and layer inputs seen so far, so a token generated after the subject is still routed by it.

Format (as peft): ``adapter_config.json`` (method, version, base model fingerprint and shapes, config,
anchors, method state) and ``adapter_model.safetensors``; both written atomically, weights first.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
import weakref
from abc import abstractmethod
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import nn

from memoe.adapters.anchors import AnchorTrie, anchor_positions
from memoe.config import from_dict
from memoe.errors import AdapterError, CacheError, ConfigError, LayerError, MissingFileError
from memoe.io import load_tensors, save_tensors, write_json
from memoe.models.arch import model_fingerprint, model_parts

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ATTACHED = "_memoe_adapters"  # model.__dict__ key: a plain list, so the adapter is not a submodule of the base


class RoutingContext:
    """What the layers of one adapter share during one forward pass."""

    def __init__(self):
        self.anchor_pos: torch.Tensor | None = None  # (B, T) absolute index of the latest anchor's last token, -1 none
        self.anchor_id: torch.Tensor | None = None  # (B, T) that anchor's id (AnchorTrie.texts index), -1 none/unknown
        self.offset = 0  # absolute index of this forward's first position
        self.mask: torch.Tensor | None = None  # (B, offset + T) True at real (non-padding) positions seen so far
        self.ids: torch.Tensor | None = None  # ids so far (cached generation only)
        self.history: dict[str, torch.Tensor] = {}  # name -> (B, T_so_far, ...) per-position values (cached generation)
        self.keep_history = False

    def anchored(self, scope: str = "after_anchor") -> torch.Tensor:
        """(B, T) True at the positions of ``scope``: ``anchor``, an anchor's last token; ``after_anchor``, there and
        every later position; ``relation``, only the later positions."""
        if scope == "after_anchor":
            return self.anchor_pos >= 0
        here = self.offset + torch.arange(self.anchor_pos.shape[1], device=self.anchor_pos.device)
        if scope == "anchor":
            return self.anchor_pos == here
        if scope == "relation":
            return (self.anchor_pos >= 0) & (self.anchor_pos != here)
        raise ConfigError(f"unknown scope {scope!r}; choose anchor, after_anchor or relation")

    def with_history(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, ...) preceded by the values of earlier decode steps (cached generation), else ``x``.
        The stored history is detached; this forward's positions keep their gradients."""
        if not self.keep_history:
            return x
        prev = self.history.get(key)
        self.history[key] = x.detach() if prev is None else torch.cat([prev, x.detach()], 1)
        return x if prev is None else torch.cat([prev, x], 1)

    def anchor_inputs(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H) for each position the layer input at its anchor's last token (zeros where none)."""
        src = self.with_history(key, x)
        pos = self.anchor_pos if self.keep_history else self.anchor_pos - self.offset
        idx = pos.clamp(min=0)
        a = src[torch.arange(src.shape[0], device=src.device)[:, None], idx]
        return a * (pos >= 0)[..., None].to(a.dtype)


class BypassLayer(nn.Module):
    """One edited layer. ``forward(x, out, ctx)`` gets the wrapped module's input and output."""

    key: str = ""

    @abstractmethod
    def forward(self, x: torch.Tensor, out: torch.Tensor, ctx: RoutingContext) -> torch.Tensor: ...

    def seed_noise(self, generator: torch.Generator) -> None:
        """Draw this layer's training noise (if it has any) from ``generator``, for reproducible training."""


class BypassAdapter(nn.Module):
    """Base of bypass adapters. Subclasses set ``method``, ``Config``, ``target`` and :meth:`build_layer`."""

    method: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type]
    #: The :class:`~memoe.models.arch.ArchSpec` module each layer wraps ("mlp" or "down_proj").
    target: ClassVar[str] = "mlp"
    #: Whether the layers route by anchor (the pre-hook then finds anchors in every forward).
    uses_anchors: ClassVar[bool] = True

    def __init__(self, config, base_info: dict, trie: AnchorTrie | None = None):
        super().__init__()
        self.config = config
        self.base_info = dict(base_info)
        self.trie = trie
        self.layers = nn.ModuleDict()
        self.enabled = True
        self.ctx = RoutingContext()
        self._given: list[list[tuple[int, int]]] | None = None
        self._given_ids: list[list[int]] | None = None
        #: Extra anchor detectors beside the trie (e.g. :class:`~memoe.adapters.anchors.EntityDetector`); not saved.
        self.detectors: list = []
        #: The folder it was loaded from (None when made in this process): the same folder is attached once.
        self.source: str | None = None
        self._handles: list = []
        self._model_ref: weakref.ref | None = None  # a weak reference: the base must not become a submodule

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, model: nn.Module, tok, config) -> "BypassAdapter":
        """A fresh adapter for ``model`` (zero-initialised: attached, it changes nothing)."""
        trie = AnchorTrie.for_tokenizer(tok) if cls.uses_anchors else None
        adapter = cls(config, base_info(model), trie)
        adapter.build()
        return adapter.to(next(model.parameters()).device).eval()  # noise-free routing until a trainer says otherwise

    def build(self) -> None:
        """Create the layers from the config and the base shapes in ``base_info`` (no model needed)."""
        n = self.base_info["num_layers"]
        for l in self.config.layers:
            if not -n <= l < n:
                raise LayerError(f"layer {l} out of range: the model has {n} layers (0..{n - 1})")
            self.layers[str(l % n)] = self.build_layer(l % n)
            self.layers[str(l % n)].key = str(l % n)

    @abstractmethod
    def build_layer(self, layer: int) -> BypassLayer:
        """One layer's module, shaped from ``self.base_info`` (``hidden_size``, ``intermediate_size``)."""

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary training loss of the method (MEMoE: load balancing), or None."""
        return None

    def gate_loss(self, rows: torch.Tensor, cols: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor | None:
        """A supervised loss on the adapter's gate at positions (``rows``, ``cols``) of the last forward, which should
        be ``wanted`` there (1 open, 0 shut); None for adapters without such a gate."""
        return None

    @property
    def sentence_reach(self) -> bool:
        """Whether an anchor routes only the tokens of its own sentence (else every later token of the text)."""
        return False

    def untouched_before(self, span: tuple[int, int]) -> int:
        """How many leading tokens of a row whose one anchor is ``span`` ([start, end)) this adapter leaves exactly
        as the base computes them, whatever its weights (training then does not recompute them:
        :mod:`memoe.frozen_prefix`). 0: it may change every token."""
        return 0

    def method_state(self) -> dict:
        """Method-specific JSON state saved in ``adapter_config.json`` (e.g. CoachHooK's alpha)."""
        return {}

    def load_method_state(self, state: dict) -> None:
        pass

    # -- attaching ------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, strict: bool = False) -> "BypassAdapter":
        """Register the hooks on ``model``. ``strict``: also refuse a base with a different fingerprint."""
        if self.attached_to is not None:
            raise AdapterError(f"this {self.method} adapter is already attached; detach it first")
        check_base(self.base_info, model, strict)
        parts = model_parts(model)
        self.to(next(model.parameters()).device)
        self._handles.append(model.base_model.register_forward_pre_hook(self._route, with_kwargs=True))
        for key, layer in self.layers.items():
            self._handles.append(parts.module(self.target, int(key)).register_forward_hook(self._layer_hook(layer)))
        model.__dict__.setdefault(_ATTACHED, []).append(self)
        self._model_ref = weakref.ref(model)
        return self

    def detach(self) -> None:
        """Remove the hooks: the model computes exactly what it computed before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        model = self.attached_to
        if model is not None:
            model.__dict__[_ATTACHED].remove(self)
        self._model_ref = None
        self.ctx = RoutingContext()

    @property
    def attached_to(self) -> nn.Module | None:
        return self._model_ref() if self._model_ref is not None else None

    def _layer_hook(self, layer: BypassLayer):
        def hook(module, args, out):
            if not self.enabled:
                return None
            return layer(args[0], out, self.ctx)

        return hook

    def _route(self, module, args, kwargs):
        """Pre-hook on the base model: padding mask and anchor positions of every token of this forward."""
        if not self.enabled:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        B, T = ref.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        ctx = self.ctx
        if start and ids is not None and ctx.ids is not None and ctx.ids.shape == (B, start):
            full = torch.cat([ctx.ids, ids], 1)
        else:
            start, full = 0, ids
            ctx.history = {}
        ctx.keep_history = cache is not None and ids is not None and self._given is None
        ctx.ids = full if ctx.keep_history else None
        ctx.offset = start
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        if mask is None or mask.dim() != 2:
            mask = torch.ones(B, start + T, dtype=torch.bool, device=ref.device)
        ctx.mask = mask[:, -(start + T):].bool() if ctx.keep_history else mask[:, -T:].bool()
        if not self.uses_anchors:
            return None
        need_rows = full is not None and (self._given is None or self.sentence_reach)
        rows = full.tolist() if need_rows else None  # once: the trie and the sentence ends both read it
        if self._given is not None:
            spans, owners = self._given, self._given_ids
        elif rows is None:
            spans, owners = [[] for _ in range(B)], None  # embeddings only: nothing to match, the bypass stays off
        else:
            spans, owners = [], []
            for row in rows:
                found = {(s, e): o for s, e, o in self.trie.find_owned(row)}  # a detector's entity has no id
                row_spans = sorted(set(found).union(*(d.find(row) for d in self.detectors)))
                spans.append(row_spans)
                owners.append([found.get(sp, -1) for sp in row_spans])
        ends = [self.trie.sentence_ends(row) for row in rows] if self.sentence_reach and rows is not None else None
        pos, ids = anchor_positions(spans, start + T, ref.device, owners, ends)
        ctx.anchor_pos, ctx.anchor_id = pos[:, start:], ids[:, start:]
        return None

    @contextlib.contextmanager
    def given_anchors(self, spans: list[list[tuple[int, int]]], ids: list[list[int]] | None = None) -> Iterator[None]:
        """Route by these ``[start, end)`` anchor spans per row (training: the requests' subjects), whose anchor ids
        are ``ids`` (per row one per span; None: unknown)."""
        old, self._given, self._given_ids = (self._given, self._given_ids), spans, ids
        try:
            yield
        finally:
            self._given, self._given_ids = old

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare base model while attached (e.g. the reference distribution of a KL term)."""
        old, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = old

    # -- undo -----------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything an edit may change (weights, anchors, method state), copied off the accelerator."""
        return {"weights": {k: v.to("cpu", copy=True) for k, v in self.state_dict().items()},
                "trie": copy.deepcopy(self.trie), "state": copy.deepcopy(self.method_state())}

    def rewind(self, snap: dict) -> None:
        """Put the adapter back exactly as :meth:`snapshot` found it."""
        self.load_state_dict(snap["weights"])
        self.trie = copy.deepcopy(snap["trie"])
        self.load_method_state(copy.deepcopy(snap["state"]))

    # -- saving ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into folder ``path`` (atomically)."""
        path = Path(path)
        tensors = {f"layers.{k}": v for k, v in self.layers.state_dict().items()}
        if self.trie is not None:
            tensors["anchors.joins"], tensors["anchors.special"] = self.trie.joins, self.trie.special
            if self.trie.stops is not None:
                tensors["anchors.stops"] = self.trie.stops
        save_tensors(path / WEIGHTS_NAME, tensors, metadata={"format": "pt", "method": self.method})
        write_json(path / CONFIG_NAME, {
            "method": self.method, "version": self.version, "base_model": self.base_info,
            "config": asdict(self.config), "anchors": self.trie.state() if self.trie is not None else None,
            "state": self.method_state(),
        })
        return path


def base_info(model: nn.Module) -> dict:
    """What an adapter records about the base it was trained on, to refuse a mismatched one later."""
    cfg, parts = model.config, model_parts(model)
    return {
        "model_type": cfg.model_type, "name_or_path": getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", ""),
        "hidden_size": cfg.hidden_size, "num_layers": parts.num_layers,
        "intermediate_size": tuple(parts.down_proj_weight(0).shape)[1],
        "vocab_size": model.get_output_embeddings().weight.shape[0], "fingerprint": model_fingerprint(model),
    }


def check_base(info: dict, model: nn.Module, strict: bool = False) -> None:
    """Raise :class:`AdapterError` naming the first field where ``model`` differs from the adapter's base."""
    have = base_info(model)
    for k in ("model_type", "hidden_size", "num_layers", "intermediate_size", "vocab_size"):
        if info.get(k) != have[k]:
            raise AdapterError(f"adapter was trained on a base with {k}={info.get(k)!r}, this model has {k}={have[k]!r} "
                               f"(adapter base: {info.get('name_or_path')!r})")
    if info.get("fingerprint") != have["fingerprint"]:
        msg = (f"adapter base fingerprint {info.get('fingerprint')} differs from this model's {have['fingerprint']}: "
               "same shapes, different weights (a fine-tuned or edited base?)")
        if strict:
            raise AdapterError(msg)
        warnings.warn(msg, stacklevel=3)


def read_adapter(path: str | Path, classes: dict[str, type[BypassAdapter]]) -> BypassAdapter:
    """Read a saved adapter folder whose ``method`` is one of ``classes`` (method -> adapter class; the registered
    ones: :func:`memoe.editors.load_adapter`); every file, key and shape is checked before anything is used."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.exists():
            raise MissingFileError(f"adapter file missing: {f}")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not a memoe adapter config ({e})") from None
    kinds = {"method": str, "version": int, "base_model": dict, "config": dict}
    for key, kind in kinds.items():
        if not isinstance(meta, dict) or key not in meta:
            raise AdapterError(f"{cfg_file}: not a memoe adapter config (missing key {key!r})")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise AdapterError(f"{cfg_file}: key {key!r} must be of type {kind.__name__}, got {meta[key]!r}")
    method, version = meta["method"], meta["version"]
    if method not in classes:
        raise AdapterError(f"{cfg_file}: unknown adapter method {method!r}; known: {sorted(classes)}")
    cls = classes[method]
    if version > cls.version:
        raise AdapterError(f"{cfg_file}: adapter format version {version} is newer than this memoe reads ({cls.version})")
    try:
        config = from_dict(cls.Config, meta["config"])
    except ConfigError as e:
        raise AdapterError(f"{cfg_file}: {e}") from None
    try:
        tensors = load_tensors(w_file)
    except CacheError as e:
        raise AdapterError(str(e)) from None
    trie = None
    if cls.uses_anchors:
        if "anchors.joins" not in tensors or "anchors.special" not in tensors:
            raise AdapterError(f"{w_file}: missing key 'anchors.joins' or 'anchors.special'")
        anchors = meta.get("anchors")
        ok = (isinstance(anchors, dict) and isinstance(anchors.get("texts"), list)
              and all(isinstance(t, str) for t in anchors["texts"]) and isinstance(anchors.get("sequences"), list)
              and all(isinstance(q, list) and q and all(isinstance(i, int) for i in q) for q in anchors["sequences"])
              and (anchors.get("owners") is None or (isinstance(anchors["owners"], list)
                   and len(anchors["owners"]) == len(anchors["sequences"])
                   and all(isinstance(o, int) and -1 <= o < len(anchors["texts"]) for o in anchors["owners"]))))
        if not ok:  # without its anchors the adapter would route nothing: an attached no-op
            raise AdapterError(f"{cfg_file}: key 'anchors' must be {{'texts': [str], 'sequences': [[int]], 'owners': [int]}} "
                               f"(the subjects the adapter routes on), got {str(anchors)[:80]!r}")
        trie = AnchorTrie(tensors.pop("anchors.joins"), tensors.pop("anchors.special"), tensors.pop("anchors.stops", None))
        trie.load_state(anchors)
    adapter = cls(config, meta["base_model"], trie)
    adapter.build()
    expected = adapter.layers.state_dict()
    got = {k[len("layers."):]: v for k, v in tensors.items() if k.startswith("layers.")}
    for k in sorted(set(expected) | set(got)):
        if k not in got:
            raise AdapterError(f"{w_file}: missing tensor 'layers.{k}'")
        if k not in expected:
            raise AdapterError(f"{w_file}: unexpected tensor 'layers.{k}'")
        if got[k].shape != expected[k].shape:
            raise AdapterError(f"{w_file}: tensor 'layers.{k}' has shape {tuple(got[k].shape)}, expected {tuple(expected[k].shape)}")
    adapter.layers.load_state_dict(got)
    adapter.load_method_state(meta.get("state") or {})
    adapter.eval().source = str(path.resolve())
    return adapter


def attached(model: nn.Module) -> list[BypassAdapter]:
    """The adapters attached to ``model``, oldest first."""
    return list(model.__dict__.get(_ATTACHED, []))


def detach(model: nn.Module, adapter: BypassAdapter | None = None) -> list[BypassAdapter]:
    """Detach ``adapter`` (default: every adapter) from ``model``; returns what was detached."""
    targets = [adapter] if adapter is not None else attached(model)
    for a in reversed(targets):
        if a.attached_to is not model:
            raise AdapterError(f"the {a.method} adapter is not attached to this model")
        a.detach()
    return targets
