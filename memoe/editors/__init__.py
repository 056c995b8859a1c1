"""The editor registry: the only place that maps method names to classes."""

from __future__ import annotations

from memoe.config import load_config
from memoe.editors.base import EditResult, Editor, EditorConfig, WeightEditor, apply_deltas, validate_requests
from memoe.editors.closed_form import EMMETEditor, MEMITEditor, ROMEEditor
from memoe.editors.coachhook import CoachHooKEditor
from memoe.editors.ft import FTConfig, FTEditor
from memoe.editors.memoe import MEMoEEditor

#: name -> editor class. Add a method by adding a line here.
REGISTRY: dict[str, type[Editor]] = {
    FTEditor.name: FTEditor,
    ROMEEditor.name: ROMEEditor,
    MEMITEditor.name: MEMITEditor,
    EMMETEditor.name: EMMETEditor,
    MEMoEEditor.name: MEMoEEditor,
    CoachHooKEditor.name: CoachHooKEditor,
}


class UnknownEditorError(KeyError):
    def __str__(self) -> str:  # KeyError would print the repr
        return self.args[0]


def editor_class(name: str) -> type[Editor]:
    if name not in REGISTRY:
        raise UnknownEditorError(f"unknown editor {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def make_editor(name: str, config_path: str | None = None, overrides: dict | None = None) -> Editor:
    """An editor by registry name, its config read from ``config_path`` (YAML) with ``overrides`` on top."""
    cls = editor_class(name)
    return cls(load_config(cls.Config, config_path, overrides))


__all__ = [
    "REGISTRY", "EditResult", "Editor", "EditorConfig", "FTConfig", "FTEditor", "WeightEditor", "apply_deltas",
    "editor_class", "make_editor", "validate_requests",
]
