"""The YAML files shipped with memoe, read as package data (``importlib.resources``), so a wheel install has them.

``memoe/configs/`` (also reachable as ``configs/`` at the top of a checkout) holds:

- ``editors/<name>.yaml``: each editor's defaults on the knowledge testbed; ``make_editor(name)`` and
  ``--editor name`` both read it, so there is one set of defaults; every editor YAML names its ``method:``;
- ``editors/<model>/<name>.yaml``: the configs made for one real model (``smollm2-135m``), chosen from its causal
  trace and a measured sweep; a real model without one is an error that says which file to add;
- ``testbed/<dataset>.yaml``: the knowledge testbeds; ``studies/<name>.yaml`` and ``eval/``: experiments.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from memoe.errors import ConfigError, UnknownNameError


def config_root() -> Path:
    """The folder of the shipped configs (inside the installed package)."""
    return Path(str(files("memoe").joinpath("configs")))


def shipped(path: str | Path) -> Path:
    """A config path as written in a YAML or on the command line: as given when it exists, else the shipped file it
    names (``configs/testbed/x.yaml`` or ``testbed/x.yaml``), so shipped experiments work outside a checkout."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts and p.parts[0] == "configs" else p.parts
    q = config_root().joinpath(*parts)
    return q if q.exists() else p


def testbed_config_path(dataset: str) -> Path:
    return config_root() / "testbed" / f"{dataset}.yaml"


def editor_config_path(name: str, model_key: str | None = None) -> Path | None:
    """The shipped config of editor ``name``: for a real model (``model_key``) ``editors/<model_key>/<name>.yaml``,
    an error naming the file to add when there is none; else ``editors/<name>.yaml`` (None if absent)."""
    editors = config_root() / "editors"
    if model_key is None:
        p = editors / f"{name}.yaml"
        return p if p.exists() else None
    p = editors / model_key / f"{name}.yaml"
    if not p.exists():
        made = sorted(d.name for d in editors.iterdir() if d.is_dir() and (d / f"{name}.yaml").exists())
        raise ConfigError(f"no {name!r} config for model {model_key!r}: add configs/editors/{model_key}/{name}.yaml (start from "
                          f"configs/editors/{name}.yaml and the model's causal trace) or pass --editor-config "
                          f"{name}=PATH" + (f"; models with one: {', '.join(made)}" if made else ""))
    return p


def study_path(name: str) -> Path:
    """A study name (``configs/studies/<name>.yaml``) or a YAML path -> the file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return shipped(p)
    p = config_root() / "studies" / f"{name}.yaml"
    if not p.exists():
        known = sorted(q.stem for q in (config_root() / "studies").glob("*.yaml"))
        raise UnknownNameError(f"no study named {name!r}; known studies: {known} (or give a YAML path)")
    return p


__all__ = ["config_root", "editor_config_path", "shipped", "study_path", "testbed_config_path"]
