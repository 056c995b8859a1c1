"""The editor registry: the only place that maps method names to classes."""

from __future__ import annotations

import os

from torch import nn

from memoe.adapters.bypass import BypassAdapter, attached, read_adapter
from memoe.config import from_dict, merge, read_yaml
from memoe.editors.base import Editor, EditorConfig, EditResult, WeightEditor, apply_deltas, validate_requests
from memoe.editors.bypass import BypassEditor
from memoe.editors.closed_form import EMMETEditor, MEMITEditor, ROMEEditor
from memoe.editors.coachhook import CoachHooKEditor
from memoe.editors.ft import FTConfig, FTEditor
from memoe.editors.kn import KNEditor
from memoe.editors.lte import LTEEditor
from memoe.editors.memoe import MEMoEEditor
from memoe.errors import AdapterError, ConfigError, UnknownNameError
from memoe.resources import editor_config_path

#: name -> editor class. Add a method by adding a line here.
REGISTRY: dict[str, type[Editor]] = {
    FTEditor.name: FTEditor,
    ROMEEditor.name: ROMEEditor,
    MEMITEditor.name: MEMITEditor,
    EMMETEditor.name: EMMETEditor,
    MEMoEEditor.name: MEMoEEditor,
    CoachHooKEditor.name: CoachHooKEditor,
    KNEditor.name: KNEditor,
    LTEEditor.name: LTEEditor,
}


#: adapter_config.json "method" -> adapter class, for every bypass editor in the registry (no second registry).
ADAPTERS: dict[str, type[BypassAdapter]] = {cls.Adapter.method: cls.Adapter for cls in REGISTRY.values() if issubclass(cls, BypassEditor)}

UnknownEditorError = UnknownNameError


def editor_class(name: str) -> type[Editor]:
    if name not in REGISTRY:
        raise UnknownEditorError(f"unknown editor {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def read_editor_config(path: str | os.PathLike) -> tuple[str, dict]:
    """(method, settings) of an editor YAML; the file must name its method (``method: rome``)."""
    data = read_yaml(path)
    method = data.pop("method", None)
    if not isinstance(method, str):
        raise ConfigError(f"{path}: an editor config names its method on a line 'method: NAME' (one of {sorted(REGISTRY)}), "
                          f"got {method!r}")
    editor_class(method)
    return method, data


def make_editor(name: str, config_path: str | os.PathLike | None = None, overrides: dict | None = None,
                model_key: str | None = None) -> Editor:
    """Editor ``name`` configured from ``config_path`` (YAML), else from its shipped defaults (``configs/editors/<name>.yaml``;
    for a real model, ``configs/editors/<model_key>/<name>.yaml``), with ``overrides`` on top. This is what
    ``--editor name`` runs."""
    cls = editor_class(name)
    path = config_path if config_path is not None else editor_config_path(name, model_key)
    data = {}
    if path is not None:
        method, data = read_editor_config(path)
        if method != name:
            raise ConfigError(f"{path} configures {method!r}, not {name!r}")
    try:
        return cls(from_dict(cls.Config, merge(data, overrides or {})))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def load_adapter(path: str | os.PathLike) -> BypassAdapter:
    """A saved adapter folder of any registered bypass method (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    return read_adapter(path, ADAPTERS)


def attach(model: nn.Module, adapter: BypassAdapter | str | os.PathLike, strict: bool = False,
           allow_duplicate: bool = False) -> BypassAdapter:
    """Attach an adapter (object or saved folder) to a loaded base model; returns the attached adapter.

    The same saved folder twice on one model would apply its edit twice, so it is refused unless
    ``allow_duplicate=True`` says that is what is wanted. ``strict``: also refuse a base with other weights."""
    if not isinstance(adapter, BypassAdapter):
        adapter = load_adapter(adapter)
    source = getattr(adapter, "source", None)
    if source and not allow_duplicate and any(getattr(a, "source", None) == source for a in attached(model)):
        raise AdapterError(f"adapter {source} is already attached to this model (attaching it again would apply its edit "
                           "twice); detach it first, or pass allow_duplicate=True to stack it deliberately")
    return adapter.attach(model, strict=strict)


__all__ = [
    "ADAPTERS", "attach", "load_adapter",
    "REGISTRY", "EditResult", "Editor", "EditorConfig", "FTConfig", "FTEditor", "WeightEditor", "apply_deltas",
    "editor_class", "make_editor", "read_editor_config", "validate_requests",
]
