"""The README and the generated docs stay true: short, the quick start runs, every option is documented."""

import copy
import dataclasses
import re
import sys
from pathlib import Path

import pytest

import memoe
from memoe.cli import cli_docs, field_docs, options

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import train  # noqa: E402

README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_links_what_exists():
    assert len(README.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_quick_start_runs(tiny_testbed_built, tmp_path, monkeypatch):
    """The README's Python quick start, on the tiny testbed (a fresh copy of it wherever it builds one)."""
    code = README.split("<!-- quickstart -->\n```python\n")[1].split("```")[0]
    fresh = lambda *a, **kw: dataclasses.replace(tiny_testbed_built, model=copy.deepcopy(tiny_testbed_built.model))
    monkeypatch.setattr(memoe, "build_testbed", fresh)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README quick start", "exec"), scope)
    assert (tmp_path / "runs" / "quickstart-adapter" / "adapter_model.safetensors").exists()
    assert scope["edit"].restored and len(memoe.adapters.attached(scope["model"])) == 1


def test_cli_docs_are_generated_from_the_current_options():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_docs(), "run: python -m memoe.cli"


@pytest.mark.parametrize("cls", [evaluate.Command, evaluate.Experiment, train.TrainJob])
def test_every_option_has_a_docstring_and_one_flag(cls):
    opts = options(cls)
    assert all(o.help for o in opts), [o.flag for o in opts if not o.help]
    assert len({o.flag for o in opts}) == len(opts)  # no flag declared twice


def test_every_config_field_is_documented():
    """Every field of every typed config carries its docstring (the CLI help and docs/cli.md are made from them)."""
    from memoe.editors import REGISTRY
    from memoe.experiment import EditTarget, Grid

    classes = [EditTarget, Grid, train.TrainJob] + [c.Config for c in REGISTRY.values()]
    for cls in classes:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert missing == [], cls.__name__
