"""Typed configs from YAML: one loader for every dataclass config in memoe.

Unknown keys and values of the wrong type or out of range are errors that name the key. Ranges live next
to the field as metadata (``field(default=..., metadata=bounds(0, None))``), so each config states them once.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from memoe.errors import ConfigError, MissingFileError

T = TypeVar("T")


def bounds(lo: float | None = None, hi: float | None = None, choices: tuple | None = None, nonempty: bool = False) -> dict:
    """Field metadata: inclusive numeric bounds (of a value, or of each item of a list), a set of allowed values,
    and for a list whether it may be empty."""
    return {"lo": lo, "hi": hi, "choices": choices, "nonempty": nonempty}


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        vals = [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(vals) if origin is tuple else vals
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; it is a number all the same
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def check_bounds(cfg: Any, prefix: str = "") -> None:
    """Check every field's :func:`bounds` metadata on a constructed config."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        lo, hi, choices = (f.metadata.get(k) for k in ("lo", "hi", "choices"))
        if f.metadata.get("nonempty") and isinstance(v, (list, tuple)) and not v:
            raise ConfigError(f"config key {prefix + f.name!r}: needs at least one value, got []")
        items = v if isinstance(v, (list, tuple)) else [v]
        for x in items:
            if x is None:
                continue
            if choices is not None and x not in choices:
                raise ConfigError(f"config key {prefix + f.name!r}: {x!r} is not one of {list(choices)}")
            if lo is not None and x < lo:
                raise ConfigError(f"config key {prefix + f.name!r}: {x!r} is below the minimum {lo}")
            if hi is not None and x > hi:
                raise ConfigError(f"config key {prefix + f.name!r}: {x!r} is above the maximum {hi}")


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and badly typed or out-of-range values."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} for {cls.__name__}; known keys: {sorted(names)}")
    for f in dataclasses.fields(cls):  # a nested section given in part keeps the rest of the field's own default
        if f.name in data and isinstance(data[f.name], dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                data[f.name] = merge(dataclasses.asdict(default), data[f.name])
    kwargs = {k: _check_type(v, hints[k], prefix + k) for k, v in data.items()}
    cfg = cls(**kwargs)
    check_bounds(cfg, prefix)
    return cfg


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` on top; nested mappings merge key by key (``None`` values in ``over`` are ignored)."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: dict | None = None) -> T:
    """``cls`` from a YAML file (or defaults), with ``overrides`` (e.g. command-line options) on top; a nested
    override such as ``{"train": {"max_steps": 50}}`` changes only that key of the section."""
    data = merge(read_yaml(path) if path else {}, overrides or {})
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
