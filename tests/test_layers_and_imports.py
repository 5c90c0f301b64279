"""blipcore's folders are layers: every import of one blipcore module by another points to its own layer or a lower
one, the imports form no cycle (top-level and function-level alike), and blipcore never imports the command line
(`train`) or the dashboard. The module graph is read from the source with ast: nothing is imported to build it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from blipcore.paths import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "blipcore"

# Bottom up. "base": the modules directly in blipcore/ (paths, io, speed, _torchvision), which import no other
# blipcore module. The package's own __init__ (its public API) re-exports the model layer: it counts as "model".
LAYERS = ("base", "model", "data", "data.prep", "runs", "evaluation", "training", "experiments")
FOLDER_LAYERS = {("model",): "model", ("data",): "data", ("data", "prep"): "data.prep", ("runs",): "runs",
                 ("evaluation",): "evaluation", ("training",): "training", ("experiments",): "experiments"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported blipcore module
    line: int
    top_level: bool  # False: inside a function or class body


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PROJECT_ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def is_module(name: str) -> bool:
    return is_package(name) or (PROJECT_ROOT / Path(*name.split("."))).with_suffix(".py").is_file()


def layer_of(module: str) -> str:
    parts = tuple(module.split(".")[1:])
    if not parts:
        return "model"
    for depth in (2, 1):
        if parts[:depth] in FOLDER_LAYERS and (len(parts) > depth or is_package(module)):
            return FOLDER_LAYERS[parts[:depth]]
    if len(parts) == 1 and not is_package(module):
        return "base"
    raise AssertionError(f"{module}: a folder of blipcore that FOLDER_LAYERS does not place; add it there")


def _nodes(tree: ast.AST) -> list[tuple[ast.stmt, bool]]:
    """Every Import / ImportFrom of a module, with whether it runs at import time (not inside a def or class)."""
    found: list[tuple[ast.stmt, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            visit(child, inner)

    visit(tree, True)
    return found


def imports_of(path: Path) -> tuple[list[Import], list[str]]:
    """The blipcore modules that `path` imports, and every other top-level name it imports (for the train /
    dashboard check)."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found, others = [], []
    for node, top in _nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            # `from X import name`: name is a module of X, or something defined in X
            modules = [f"{parent}.{alias.name}" if is_module(f"{parent}.{alias.name}") else parent
                       for alias in node.names]
        for module in dict.fromkeys(modules):
            if module.split(".")[0] == "blipcore":
                assert is_module(module), f"{path}:{node.lineno}: imports {module}, which does not exist"
                found.append(Import(source, module, node.lineno, top))
            else:
                others.append(module)
    return found, others


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {path: imports_of(path) for path in SOURCES}
EDGES = [edge for found, _ in GRAPH.values() for edge in found]


def test_the_walk_sees_every_layer_and_the_imports_it_should():
    assert {layer_of(module_name(path)) for path in SOURCES} == set(LAYERS)
    pairs = {(edge.source, edge.target) for edge in EDGES}
    # a few imports known to exist, top-level and inside functions, absolute and relative
    assert ("blipcore.evaluation.evaluator", "blipcore.evaluation.metrics") in pairs  # from . import metrics as M
    assert ("blipcore.training.trainer", "blipcore.data") in pairs  # inside Trainer._build
    assert ("blipcore.runs.rundir", "blipcore.model.blip") in pairs  # inside a method
    assert ("blipcore.training.environment", "blipcore") in pairs  # from .. import __version__


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_imports_point_to_the_same_layer_or_a_lower_one(path):
    found, _ = GRAPH[path]
    own = LAYERS.index(layer_of(module_name(path)))
    upward = [f"line {edge.line}: {edge.target} ({layer_of(edge.target)})" for edge in found
              if LAYERS.index(layer_of(edge.target)) > own]
    assert not upward, f"{path.relative_to(PROJECT_ROOT)} ({LAYERS[own]}) imports a higher layer: {upward}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (module -> the modules it imports) as [a, b, ..., a], or None: depth-first search, where
    an edge back to a module on the current path closes a cycle."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle_between_blipcore_modules():
    graph: dict[str, set[str]] = {}
    for edge in EDGES:
        if edge.target != edge.source:
            graph.setdefault(edge.source, set()).add(edge.target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_blipcore_never_imports_train_or_dashboard(path):
    _, others = GRAPH[path]
    assert not [name for name in others if name.split(".")[0] in ("train", "dashboard")], path


def test_the_checks_catch_an_upward_import_and_a_cycle():
    assert LAYERS.index(layer_of("blipcore.model.blip")) < LAYERS.index(layer_of("blipcore.training.trainer"))
    assert layer_of("blipcore.data.prep.fetch") == "data.prep" and layer_of("blipcore.data") == "data"
    assert layer_of("blipcore.io") == "base" and layer_of("blipcore") == "model"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


# Sizes the code keeps so that a module does one job and a function reads on one screen (docs/code-map.md)
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
SIZED = [path for folder in ("blipcore", "train", "dashboard")
         for path in sorted((PROJECT_ROOT / folder).rglob("*.py"))]


def oversized(source: str) -> list[str]:
    """What in `source` is over the limits: the module's line count, each function's (its decorators excluded)."""
    lines = len(source.splitlines())
    found = [f"module: {lines} lines"] if lines > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{node.name} (line {node.lineno}): {length} lines")
    return found


@pytest.mark.parametrize("path", SIZED, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_no_module_over_600_lines_and_no_function_over_80(path):
    found = oversized(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(PROJECT_ROOT)}: {'; '.join(found)}"


def function(name: str, body_lines: int) -> str:
    return f"def {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(body_lines))


def test_the_size_check_catches_a_long_function_and_a_long_module():
    assert oversized(function("fits", 79)) == []
    assert oversized(function("long", 80)) == ["long (line 1): 81 lines"]
    assert oversized("x = 1\n" * 601) == ["module: 601 lines"]
