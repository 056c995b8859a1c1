import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memoe.config import ConfigError, bounds, from_dict, load_config, merge
from memoe.editors import REGISTRY, read_editor_config
from memoe.experiment import Experiment
from memoe.resources import config_root
from memoe.testbed import TestbedConfig


@dataclass
class Demo:
    steps: int = field(default=3, metadata=bounds(1, 10))
    lr: float = field(default=0.1, metadata=bounds(0.0))
    layers: list[int] = field(default_factory=lambda: [1])
    kind: str = field(default="a", metadata=bounds(choices=("a", "b")))
    name: str | None = None


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'stpes'"):
        from_dict(Demo, {"stpes": 3})


@pytest.mark.parametrize("data, key", [({"steps": 0}, "steps"), ({"steps": 11}, "steps"), ({"lr": -1}, "lr"),
                                       ({"kind": "c"}, "kind"), ({"steps": "x"}, "steps"), ({"layers": [1, "a"]}, "layers[1]")])
def test_bad_values_are_named(data, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        from_dict(Demo, data)


def test_types_are_coerced_where_safe():
    d = from_dict(Demo, {"lr": 1, "layers": [2, 3], "name": None})
    assert d.lr == 1.0 and isinstance(d.lr, float) and d.layers == [2, 3]


def test_yaml_file_errors_name_the_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("steps: 99\n")
    with pytest.raises(ConfigError, match=f"{p}.*'steps'"):
        load_config(Demo, p)


# Every YAML in configs/ loads into its dataclass, so configs cannot drift from the code.
CONFIGS = sorted(Path(config_root()).rglob("*.yaml"))


def config_class(path: Path):
    rel = path.relative_to(config_root())
    if rel.parts[0] == "testbed":
        return TestbedConfig
    if rel.parts[0] in ("eval", "studies"):
        return Experiment
    raise AssertionError(f"no config class known for {rel}")


def test_configs_dir_is_populated():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(config_root())))
def test_every_config_loads(path):
    if path.relative_to(config_root()).parts[0] == "editors":  # an editor YAML names its method
        method, data = read_editor_config(path)
        cfg = from_dict(REGISTRY[method].Config, data)
    else:
        cfg = load_config(config_class(path), path)
    assert cfg is not None


def test_overrides_merge_nested_sections_key_by_key():
    base = {"adapter": {"layers": [0], "rank": 32}, "replay": 100, "lr": 0.1}
    assert merge(base, {"adapter": {"layers": [3]}, "replay": None, "lr": 0.2}) == \
        {"adapter": {"layers": [3], "rank": 32}, "replay": 100, "lr": 0.2}
    assert base["adapter"] == {"layers": [0], "rank": 32}  # the input is not changed
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}  # a mapping replaces a scalar


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: 3\nlr: [0.1\n")
    with pytest.raises(ConfigError, match=f"{p}: not valid YAML at line"):
        load_config(Demo, p)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads ``1e-3`` as the string "1e-3"; it was rejected as "not a number"."""
    p = tmp_path / "x.yaml"
    p.write_text("lr: 1e-3\n")
    assert load_config(Demo, p).lr == 0.001
    p.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="'lr': expected a number, got 'fast'"):
        load_config(Demo, p)


@pytest.mark.parametrize("name, over", [("memoe", {"adapter": {"layers": []}}), ("ft", {"layers": []}),
                                        ("memit", {"layers": []}), ("coachhook", {"layers": []})])
def test_empty_layer_list_is_a_config_error(name, over):
    """``layers: []`` used to reach the optimiser ("got an empty parameter list")."""
    with pytest.raises(ConfigError, match="layers': needs at least one value"):
        load_config(REGISTRY[name].Config, None, over)
