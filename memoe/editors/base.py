"""The editor contract: every method in memoe applies a list of requests and returns a restorable result.

- :class:`Editor` ``.apply(model, tok, requests) -> EditResult``: the one entry point the harness calls.
- :class:`WeightEditor` is the base of editors that change base weights: subclasses only *compute* the
  deltas (``compute_deltas``); applying, timing and bit-exact restoring are done here, once.
- :class:`EditResult` keeps the original tensors it overwrote (or the modules it attached), so
  ``restore()`` gives back the exact original model, bit for bit.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from memoe.adapters.lora import save_lora
from memoe.batching import in_context, target_nll
from memoe.config import from_dict
from memoe.contexts import PrefixMemo
from memoe.data.records import EditRequest, RecordError
from memoe.errors import DataError
from memoe.tokens import subject_span


@dataclass
class EditorConfig:
    """Base class of every editor's typed config (a dataclass loaded from YAML by :mod:`memoe.config`)."""


@dataclass
class EditResult:
    """What one ``apply`` changed, how long it took, and how to undo it."""

    editor: str
    requests: list[EditRequest]
    seconds: float = 0.0
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    """Parameter name -> the change added to it (weight editors)."""
    modules: list[nn.Module] = field(default_factory=list)
    """Modules attached beside the base model (bypass editors)."""
    info: dict = field(default_factory=dict)
    """Editor-specific diagnostics (losses, steps, condition numbers ...)."""
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _model: nn.Module | None = field(default=None, repr=False)
    restored: bool = False

    def save_lora(self, path, rank: int | None = None):
        """Save this edit's weight deltas as a PEFT LoRA adapter (see :mod:`memoe.adapters.lora`)."""
        if not self.deltas or self._model is None:
            raise ValueError(f"{self.editor} edit has no weight deltas to export")
        return save_lora(self._model, self.deltas, path, rank=rank)

    def restore(self) -> None:
        """Give back the model exactly as it was before this edit (bit for bit). Idempotent."""
        if self.restored:
            return
        if self._model is not None:
            params = dict(self._model.named_parameters())
            with torch.no_grad():
                for name, original in self._originals.items():
                    params[name].copy_(original)
        for undo in reversed(self._undo):
            undo()
        self.restored = True


def validate_requests(tok, requests: list[EditRequest]) -> None:
    """Reject an empty list and requests an editor cannot locate, naming the request."""
    if not requests:
        raise DataError("no edit requests given: pass a non-empty list of EditRequest")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise TypeError(f"request {i} is a {type(r).__name__}, expected memoe.EditRequest")
        if r.prompt.count("{}") != 1:
            if r.subject and r.subject in r.prompt:
                raise RecordError(r.case_id, i, "prompt", f"use '{{}}' where the subject goes: {r.prompt!r}")
            raise RecordError(r.case_id, i, "prompt", f"subject {r.subject!r} does not occur in prompt {r.prompt!r}")
        if not r.target_new or not r.target_new.strip():
            raise RecordError(r.case_id, i, "target_new", "empty target")
        subject_span(tok, r.prompt, r.subject)


#: An edit that moves no request's new-target NLL by this much (nats) is reported as a no-op.
NO_OP_NLL = 1e-4


@torch.no_grad()
def request_nll(model: nn.Module, tok, requests: list[EditRequest], batch_size: int = 64) -> torch.Tensor:
    """(N,) each request's new-target NLL on its bare prompt, as the model answers it now (an in-context editor's
    retrieved edits included)."""
    prompts = [r.text for r in requests]
    return torch.cat([target_nll(model, tok, in_context(model, prompts[i : i + batch_size]),
                                 [r.target_new for r in requests[i : i + batch_size]]).cpu()
                      for i in range(0, len(requests), batch_size)])


class Editor(ABC):
    """Base of all editors. Subclasses set ``name`` and ``Config`` and implement :meth:`_apply`."""

    name: ClassVar[str]
    Config: ClassVar[type[EditorConfig]]
    #: One line on what the method does, and its paper (the README's method table is generated from these).
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: True when ``apply`` may be called again on an already edited model (sequential modes).
    supports_sequential: ClassVar[bool] = True

    def __init__(self, config: EditorConfig | dict | None = None):
        if config is None or isinstance(config, dict):
            config = from_dict(self.Config, config or {})
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.prefixes = PrefixMemo()
        """The context prefixes this editor generated, per model (see :mod:`memoe.contexts`)."""

    @classmethod
    def layer_override(cls, layers: list[int]) -> dict:
        """Config override that makes this editor edit ``layers`` (used by layer sweeps)."""
        return {"layers": list(layers)}

    def apply(self, model: nn.Module, tok, requests: list[EditRequest]) -> EditResult:
        """Apply ``requests`` to ``model`` in place and return the restorable result. Warns when the edit left
        every request's new-target likelihood where it was (a no-op edit, e.g. a covariance weight so large that
        the update vanishes); ``info`` records the mean new-target NLL before and after (not timed)."""
        validate_requests(tok, requests)
        before = request_nll(model, tok, requests)
        t0 = time.perf_counter()
        result = self._apply(model, tok, list(requests))
        result.seconds = time.perf_counter() - t0
        after = request_nll(model, tok, requests)
        result.info["target_nll_before"] = round(before.mean().item(), 4)
        result.info["target_nll_after"] = round(after.mean().item(), 4)
        if (after - before).abs().max().item() < NO_OP_NLL:
            warnings.warn(f"{self.name}: the edit left all {len(requests)} requests' new-target NLL unchanged (mean "
                          f"{before.mean().item():.3f}): check its layers and update weight", stacklevel=2)
        return result

    @abstractmethod
    def _apply(self, model: nn.Module, tok, requests: list[EditRequest]) -> EditResult: ...


class WeightEditor(Editor):
    """An editor that adds deltas to base weights. Subclasses implement only :meth:`compute_deltas`."""

    @abstractmethod
    def compute_deltas(self, model: nn.Module, tok, requests: list[EditRequest]) -> tuple[dict[str, torch.Tensor], dict]:
        """Return ``({parameter name: delta}, info)`` *without* changing the model."""

    def _apply(self, model: nn.Module, tok, requests: list[EditRequest]) -> EditResult:
        deltas, info = self.compute_deltas(model, tok, requests)
        return apply_deltas(model, deltas, self.name, requests, info)


@contextlib.contextmanager
def scratch_weights(weights: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Let an editor change ``weights`` while it *computes* an edit; on exit (error or not) put their values
    and ``requires_grad`` flags back, so computing never changes the model. Yields the original values."""
    originals = [w.detach().clone() for w in weights]
    flags = [w.requires_grad for w in weights]
    try:
        yield originals
    finally:
        with torch.no_grad():
            for w, w0, flag in zip(weights, originals, flags):
                w.copy_(w0)
                w.requires_grad_(flag)


def apply_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], editor: str,
                 requests: list[EditRequest] | None = None, info: dict | None = None) -> EditResult:
    """Add each delta to its parameter, keeping the original tensors for :meth:`EditResult.restore`."""
    params = dict(model.named_parameters())
    for name, d in deltas.items():
        if name not in params:
            raise KeyError(f"delta for unknown parameter {name!r}")
        if d.shape != params[name].shape:
            raise ValueError(f"delta for {name!r} has shape {tuple(d.shape)}, parameter has {tuple(params[name].shape)}")
    originals = {name: params[name].detach().clone() for name in deltas}
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d.to(params[name].dtype))
    return EditResult(editor=editor, requests=list(requests or []), deltas=deltas, info=info or {},
                      _originals=originals, _model=model)
