"""Imports run one way (issue 12): basics (paths, config, geometry) -> data -> env, features,
evaluation -> model -> distill -> training (trainer, agent, recipes, experiments) -> deploy, benchmarks,
demo -> CLI.  Every import of the package, at module level or inside a function, is checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import minivln

PACKAGE = Path(minivln.__file__).parent
LAYERS = {
    "paths": 0, "config": 0, "geometry": 0,
    "data": 1,
    "env": 2, "features": 2, "evaluation": 2,
    "model": 3,
    "distill": 4,
    "training": 5, "experiment": 5, "show": 5,
    "deploy": 6, "bench": 6, "demo": 6,
    "cli": 7, "__main__": 7,
}


def layer_of(module: str) -> int | None:
    """The layer of a ``minivln`` module (None outside the package); a ``cli`` module of any
    subpackage is the command line's (it wires the layers together)."""
    parts = module.split(".")
    if parts[0] != "minivln":
        return None
    if len(parts) == 1:
        return 0
    if parts[-1] == "cli":
        return LAYERS["cli"]
    if parts[1] not in LAYERS:
        raise KeyError(f"{module}: no layer assigned; add it to LAYERS")
    return LAYERS[parts[1]]


def upward_imports(module: str, source: str) -> list[str]:
    """Imports in ``source`` (of ``module``) of a layer above the module's own."""
    me = layer_of(module)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            theirs = layer_of(name)
            if theirs is not None and theirs > me:
                found.append(f"{module} (layer {me}) imports {name} (layer {theirs}), line {node.lineno}")
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = ("minivln", *f.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), f))
    return out


def test_every_import_of_the_package_runs_down_the_layers():
    modules = _modules()
    assert len(modules) > 50
    bad = [msg for name, f in modules for msg in upward_imports(name, f.read_text())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module, source", [
    ("minivln.model.duet", "from minivln.training.trainer import Trainer\n"),
    ("minivln.data.r2r", "def f():\n    import minivln.env.graph\n"),
    ("minivln.distill.losses", "from minivln.training import agent\n"),
])
def test_the_check_finds_an_upward_import(module, source):
    assert upward_imports(module, source)


def test_the_check_allows_downward_imports_and_the_cli():
    assert not upward_imports("minivln.training.agent", "from minivln.model.duet import DUET\n")
    assert not upward_imports("minivln.deploy.cli", "from minivln.bench.model import bench\n")


def import_graph(modules: list[tuple[str, str]]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in it; ``from a.b import c`` names the
    module ``a.b.c`` when that is a module, else ``a.b``)."""
    names = {name for name, _ in modules}
    graph: dict[str, set[str]] = {}
    for module, source in modules:
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in names and t != module)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: one per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_of_the_package_imports_itself_round_a_circle():
    """Within a layer too (issue 12: the recipes imported each other; the exporter and the runtime did)."""
    graph = import_graph([(name, f.read_text()) for name, f in _modules()])
    assert not import_cycles(graph), import_cycles(graph)


def test_the_cycle_check_finds_a_circle_through_a_function_local_import():
    modules = [
        ("minivln.deploy.export", "def check():\n    from minivln.deploy.runtime import make_session\n"),
        ("minivln.deploy.runtime", "from minivln.deploy.export import MANIFEST\n"),
        ("minivln.deploy.format", "MANIFEST = 'export.json'\n"),
    ]
    assert import_cycles(import_graph(modules)) == [["minivln.deploy.export", "minivln.deploy.runtime"]]
    modules[1] = ("minivln.deploy.runtime", "from minivln.deploy.format import MANIFEST\n")
    assert import_cycles(import_graph(modules)) == []
