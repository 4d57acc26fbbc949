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
