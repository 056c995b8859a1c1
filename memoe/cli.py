"""Command lines derived from typed config dataclasses, and the one wrapper that turns user errors into one line.

As litgpt's ``CLI``: a script declares its options once, as dataclass fields with a docstring under each; this module
builds the ``argparse`` parser from them (type, choices from :func:`~memoe.config.bounds`, help from the docstring,
the default), so no option is declared twice, and ``docs/cli.md`` is generated from the same declarations.

- nested dataclasses are flattened (``edits.dataset`` is ``--dataset``), with the field's ``cli_prefix`` metadata
  in front where names would clash (``scoring.batch_size`` is ``--score-batch-size``);
- a list field takes its singular name and one or more values, repeatable (``--editor rome memit``, ``--batch-size 1
  --batch-size 16``); a ``dict[str, str]`` field takes ``NAME=VALUE`` (``--editor-config rome=my.yaml``); other mappings
  are YAML only;
- a field with ``cli=False`` metadata is left out (the script sets it from another option);
- ``bool`` fields are switches: ``--known-only`` sets a default-False field, ``--no-progress`` clears a default-True one.

Only the options given on the command line are returned (as a nested dict of overrides), so they go on top of a
YAML file and of the defaults.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Callable

from memoe.errors import ConfigError, MemoeError


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it (over the class and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


@dataclasses.dataclass
class Option:
    """One command-line option and the config field it sets."""

    flag: str
    path: tuple[str, ...]
    kind: str  # value, list, pairs, switch
    type: Any
    default: Any
    help: str
    choices: tuple | None = None


def options(cls: type, path: tuple[str, ...] = (), prefix: str = "", defaults: object = None) -> list[Option]:
    """The command-line options of dataclass ``cls``, nested dataclasses flattened; ``defaults``: the instance whose
    values are the defaults (a nested section's own default, which may differ from ``cls()``)."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        tp = _unwrap(hints[f.name])
        default = getattr(defaults, f.name) if defaults is not None else f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc, choices = docs.get(f.name, ""), f.metadata.get("choices")
        if f.metadata.get("cli") is False:
            continue  # set by the script from another option
        if dataclasses.is_dataclass(tp):
            out += options(tp, path + (f.name,), prefix + f.metadata.get("cli_prefix", ""), default)
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        name = prefix + f.name
        if tp is bool:
            flag = name if not default else "no-" + name
            doc = doc if not default else doc + " On by default; this switch turns it off."
            out.append(Option("--" + flag.replace("_", "-"), path + (f.name,), "switch", bool, default, doc))
        elif origin is list:
            flag = name[:-1] if name.endswith("s") else name
            out.append(Option("--" + flag.replace("_", "-"), path + (f.name,), "list", args[0], default, doc, choices))
        elif origin is dict and args == (str, str):
            flag = name[:-1] if name.endswith("s") else name
            out.append(Option("--" + flag.replace("_", "-"), path + (f.name,), "pairs", str, default, doc))
        elif origin is dict or tp is dict:
            continue  # YAML only
        else:
            out.append(Option("--" + name.replace("_", "-"), path + (f.name,), "value", tp, default, doc, choices))
    return out


def _default_text(o: Option) -> str:
    if o.kind == "switch" or o.default in (None, [], {}):
        return ""
    shown = " ".join(map(str, o.default)) if isinstance(o.default, list) else o.default
    return f" (default: {shown})"


def add_options(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> list[Option]:
    """Add the options of ``cls`` to ``parser`` (only given options land in the namespace); returns them."""
    group = parser.add_argument_group(title or cls.__name__) if title is not False else parser
    opts = options(cls)
    for o in opts:
        kw: dict[str, Any] = {"dest": ".".join(o.path), "default": argparse.SUPPRESS, "help": (o.help + _default_text(o)).replace("%", "%%")}
        if o.kind == "switch":
            kw["action"] = "store_false" if o.default else "store_true"
        elif o.kind == "list":
            kw.update(action="extend", nargs="+", type=o.type, choices=o.choices, metavar=o.flag[2:].upper().replace("-", "_"))
        elif o.kind == "pairs":
            kw.update(action="append", metavar="NAME=VALUE")
        else:
            kw.update(type=o.type, choices=o.choices, metavar=None if o.choices else o.flag[2:].upper().replace("-", "_"))
        group.add_argument(o.flag, **kw)
    return opts


def overrides(ns: argparse.Namespace, opts: list[Option]) -> dict:
    """The options given on the command line as a nested dict of config overrides."""
    out: dict = {}
    given = vars(ns)
    for o in opts:
        dest = ".".join(o.path)
        if dest not in given:
            continue
        value = given[dest]
        if o.kind == "pairs":
            pairs = {}
            for item in value:
                if "=" not in item:
                    raise ConfigError(f"{o.flag} expects NAME=VALUE, got {item!r}")
                k, v = item.split("=", 1)
                pairs[k] = v
            value = pairs
        node = out
        for key in o.path[:-1]:
            node = node.setdefault(key, {})
        node[o.path[-1]] = value
    return out


def markdown(cls: type, title: str) -> str:
    """A Markdown table of the options of ``cls`` (for ``docs/cli.md``)."""
    rows = [f"### {title}", "", "| option | config key | default | what it does |", "|---|---|---|---|"]
    for o in options(cls):
        arg = o.flag if o.kind == "switch" else f"{o.flag} {'NAME=VALUE' if o.kind == 'pairs' else o.flag[2:].upper().replace('-', '_')}"
        default = "" if o.kind == "switch" else _default_text(o)[len(" (default: "):-1]
        choices = f" One of: {', '.join(map(str, o.choices))}." if o.choices else ""
        rows.append(f"| `{arg}` | `{'.'.join(o.path)}` | {default} | {o.help.replace('|', '/')}{choices} |")
    return "\n".join(rows)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's ``main``: a :class:`~memoe.errors.MemoeError` (a mistake in the input) becomes one line on stderr
    and exit code 2; Ctrl-C exits 130; anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except MemoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def cli_docs() -> str:
    """``docs/cli.md``: every option of ``evaluate.py`` and ``train.py`` (run from a checkout, where they live)."""
    import evaluate
    import train

    parts = ["# Command-line options", "",
             "Generated by `python -m memoe.cli` from the dataclasses that declare the options (their field docstrings);",
             "do not edit by hand. Every option is also a YAML key (`--config` for `evaluate.py`): the config key column",
             "gives its place, and the command line goes on top of the YAML.", "",
             "## evaluate.py", "", evaluate.__doc__.strip().split("\n\n")[0], "",
             markdown(evaluate.Command, "What to do"), "", markdown(evaluate.Experiment, "The experiment"), "",
             "## train.py", "", train.__doc__.strip().split("\n\n")[0], "", markdown(train.TrainJob, "The job"), ""]
    return "\n".join(parts)


__all__ = ["Option", "add_options", "cli_docs", "field_docs", "markdown", "options", "overrides", "run_cli"]


if __name__ == "__main__":  # python -m memoe.cli [PATH]: write docs/cli.md
    from memoe.io import write_text

    out = sys.argv[1] if len(sys.argv) > 1 else "docs/cli.md"
    write_text(out, cli_docs())
    print(f"wrote {out}")
