"""The shape of the package, read from its source (no import): one room per concept.

* No import cycle among segtrain's modules, counting every import: top-level ones, those under
  ``TYPE_CHECKING`` and those inside functions (a lazy import is still a dependency).
* No function over 90 lines.
* No module imports a command-line module (their libraries live elsewhere: inference,
  checkpoints, ...), and no module is named like a standard-library module (run as a file,
  segtrain/ comes first on sys.path until train.py/evaluate.py fix it).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "segtrain"
MODULES = {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}
CLI_MODULES = {"train", "evaluate", "predict", "report"}  # command lines: nothing may import them
MAX_FUNCTION_LINES = 90


def imported_modules(source: str) -> set[str]:
    """The segtrain modules a module's ``source`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("segtrain.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and (node.module + ".").startswith("segtrain."):
                parts = node.module.split(".")
                # `from segtrain import a, b` names modules; `from segtrain.a import x` names one.
                found |= {alias.name for alias in node.names} if len(parts) == 1 else {parts[1]}
            elif node.level == 1:  # `from .files import x` / `from . import files`
                found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


GRAPH = {name: (imported_modules(path.read_text()) & MODULES.keys()) - {name} for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_reader_sees_imports_of_every_kind():
    """The checks below are only as good as the import reader: it must see each form."""
    source = """
import segtrain.a
import segtrain.b.inner as b
from segtrain import c, d
from segtrain.e import thing
from .f import other
from . import g
if TYPE_CHECKING:
    from segtrain.h import Type
def lazy():
    from segtrain.i import later
import segtrainer
from segtrainer import j
"""
    assert imported_modules(source) == set("abcdefghi")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_no_module_imports_a_command_line():
    importers = {name: sorted(GRAPH[name] & CLI_MODULES) for name in GRAPH if GRAPH[name] & CLI_MODULES}
    assert importers == {}


def test_no_module_shadows_the_standard_library():
    assert sorted(MODULES.keys() & sys.stdlib_module_names) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_over_90_lines(name):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(MODULES[name].read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
