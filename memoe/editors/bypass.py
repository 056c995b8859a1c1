"""The base of editors that keep their edits in a bypass adapter beside the frozen base (MEMoE, CoachHooK).

Written once here, as :class:`~memoe.editors.base.WeightEditor` is for weight editors:

- **find**: the adapter of this method attached to the model, whoever made it: an earlier edit, another editor
  of the same method, or a folder loaded with :func:`memoe.attach` (so a saved adapter can be edited further);
- **create**: on the first edit, a zero-initialised adapter (:meth:`new_adapter_config`) attached to the model;
- **snapshot / undo**: the adapter's state before the edit; ``restore()`` rewinds to it, or detaches an adapter
  the edit created. The base weights are never touched.

A subclass sets ``Adapter`` and implements :meth:`new_adapter_config` and :meth:`edit` (what one batch of requests
does to the adapter); :meth:`check_adapter` may refuse an attached adapter that does not fit its config.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

from torch import nn

from memoe.adapters.bypass import BypassAdapter, attached
from memoe.data.records import EditRequest
from memoe.editors.base import Editor, EditResult


class BypassEditor(Editor):
    """An editor whose edits live in a :class:`~memoe.adapters.bypass.BypassAdapter` of class ``Adapter``."""

    Adapter: ClassVar[type[BypassAdapter]]

    def adapter(self, model: nn.Module) -> BypassAdapter | None:
        """The ``Adapter`` attached to ``model`` (the most recent one), if any."""
        return next((a for a in reversed(attached(model)) if isinstance(a, self.Adapter)), None)

    @abstractmethod
    def new_adapter_config(self, model: nn.Module, tok) -> Any:
        """The config of the adapter the first edit creates."""

    def check_adapter(self, adapter: BypassAdapter, model: nn.Module) -> None:
        """Raise a :class:`~memoe.errors.ConfigError` when an attached adapter does not fit this editor's config."""

    @abstractmethod
    def edit(self, model: nn.Module, tok, adapter: BypassAdapter, requests: list[EditRequest]) -> dict:
        """Write ``requests`` into the attached ``adapter``; return the edit's info (losses, steps ...)."""

    def snapshot(self, adapter: BypassAdapter) -> Any:
        """What :meth:`rewind` needs to undo one edit (the adapter's state; a subclass may add its own)."""
        return adapter.snapshot()

    def rewind(self, adapter: BypassAdapter, snap: Any) -> None:
        adapter.rewind(snap)

    def _apply(self, model: nn.Module, tok, requests: list[EditRequest]) -> EditResult:
        adapter = self.adapter(model)
        created = adapter is None
        if created:
            adapter = self.Adapter.create(model, tok, self.new_adapter_config(model, tok)).attach(model)
        else:
            self.check_adapter(adapter, model)
        before = None if created else self.snapshot(adapter)

        def undo() -> None:
            if created:
                adapter.detach()
            else:
                self.rewind(adapter, before)

        try:
            info = self.edit(model, tok, adapter, requests)
        except BaseException:
            undo()  # a failed edit leaves the model as it found it
            raise
        return EditResult(editor=self.name, requests=list(requests), modules=[adapter], info=info, _undo=[undo])


__all__ = ["BypassEditor"]
