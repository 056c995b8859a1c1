"""The package's import graph: no cycle, and no module imports a layer above its own."""

import ast
from pathlib import Path

import memoe

ROOT = Path(memoe.__file__).parent
#: Lowest first. A module may import its own layer's modules and any layer below, never one above.
LAYERS = [
    {"errors"}, {"io"}, {"config"}, {"resources", "tokens", "nethook", "batching", "contexts"}, {"models"}, {"data"},
    {"locate", "retrieval", "frozen_prefix"},
    {"adapters"}, {"training"}, {"editors"}, {"evaluation"}, {"trace"}, {"testbed"}, {"experiment"}, {"cli"}, {"__init__"},
]


def module_name(path: Path) -> str:
    parts = ("memoe",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """Module -> the memoe modules it imports (anywhere in the file: imports inside functions count too)."""
    mods = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for name, path in mods.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "memoe":
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    out.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == "memoe")
        edges[name] = out - {name}
    return edges


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_module_has_a_layer():
    for m in graph():
        assert layer(m) >= 0, m


def test_no_module_imports_a_layer_above_its_own():
    bad = [(a, b) for a, bs in graph().items() for b in bs if layer(b) > layer(a)]
    assert bad == []


def test_the_import_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    assert cycles == []


def test_imports_inside_functions_are_optional_dependencies_only():
    """Every memoe import is at the top of its file, so the graph above is what a reader sees."""
    inside = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memoe"):
                        inside.append(f"{module_name(path)}: {node.module}")
    assert inside == []
