"""The package's import graph has no cycle: every `import` in flowers/, at module level and inside
functions, read with ast (an import inside a function is still a dependency; it only hides a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "flowers"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The flowers modules that the file at path imports (anywhere in it)."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", known)


def imports_in(source: str, this: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `source` (the module `this`) imports, relative imports resolved."""
    package = this if is_package else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` depends on the module; `from module import name`
            # (or `from package import name` of its face) on that module or package.
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != this}


def import_graph() -> dict[str, set[str]]:
    """module -> the flowers modules it imports. A package that discovers its modules with
    pkgutil.iter_modules(__path__) (the export format registry) imports every one of them."""
    found = modules()
    graph = {name: imported(path, set(found)) for name, path in found.items()}
    for name, path in found.items():
        if path.name == "__init__.py" and "pkgutil.iter_modules(__path__)" in path.read_text():
            graph[name] |= {m for m in found if m.rpartition(".")[0] == name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 for one that imports no flowers module, else 1 + its highest import."""
    memo: dict[str, int] = {}

    def floor(node: str) -> int:
        if node not in memo:
            memo[node] = 1 + max((floor(t) for t in graph[node]), default=-1)
        return memo[node]

    return {node: floor(node) for node in graph}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40
    assert cycles(graph) == []


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert floors({"a": {"b"}, "b": set()}) == {"a": 1, "b": 0}


KNOWN = {"flowers", "flowers.data", "flowers.host", "flowers.errors", "flowers.export",
         "flowers.export.run", "flowers.images"}


@pytest.mark.parametrize(("source", "expected"), [
    ("from flowers import data\n", {"flowers.data"}),
    ("from flowers import __version__, data\n", {"flowers", "flowers.data"}),
    ("def f():\n    from flowers.export import run\n", {"flowers.export.run"}),
    ("import flowers.images\n", {"flowers.images"}),
    ("from . import host\n", {"flowers.host"}),
    ("from .errors import FlowersError\n", {"flowers.errors"}),
    ("from ..images import load_image_files\n", {"flowers.images"}),
    ("import numpy\nfrom tensorflow import keras\n", set()),
])
def test_every_form_of_import_is_an_edge(source, expected):
    this = "flowers.export.run" if ".." in source else "flowers.cli"
    assert imports_in(source, this, False, KNOWN) == expected


def test_low_floors_stay_below_the_framework_code():
    level = floors(import_graph())
    for bottom in ("flowers.errors", "flowers.paths", "flowers.processes", "flowers.images"):
        assert level[bottom] <= 1, bottom
    assert level["flowers.paths"] < level["flowers.config"] < level["flowers.data"]


def test_a_registry_that_discovers_its_modules_depends_on_each():
    graph = import_graph()
    assert {"flowers.export.formats.onnx", "flowers.export.formats.keras"} <= graph["flowers.export.formats"]


# The layers of docs/architecture.md, bottom-up: a module imports only from its own
# layer or the ones below.
LAYERS = [
    ("foundations", {"paths", "processes", "toolenvs", "host", "files", "metrics", "tables",
                     "report_stats", "errors", "faults", "interrupt", "graph_memory"}),
    ("settings, data", {"config", "backbones", "weights", "data", "folders", "images", "runs"}),
    ("backends", {"backend", "distribute", "workers"}),
    ("model", {"model", "fold", "randomness", "checkpoint"}),
    ("jobs", {"training", "tracking", "export", "serve", "bench", "parity", "report", "report_text",
              "report_charts"}),
    ("command line", {"cli", "__main__"}),
]


def layer_of(module: str) -> int:
    top = module.removeprefix("flowers.").split(".")[0]
    if module == "flowers":
        return 0  # the package face: __version__
    for level, (_, members) in enumerate(LAYERS):
        if top in members:
            return level
    raise AssertionError(f"{module} is in no layer of docs/architecture.md")


def test_every_import_goes_to_the_same_layer_or_below():
    upward = sorted(f"{module} ({LAYERS[layer_of(module)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
                    for module, targets in import_graph().items() for target in targets
                    if layer_of(target) > layer_of(module))
    assert upward == []


# A shared concern's one home (docs/architecture.md): what other modules may not do themselves.
HOMES = {
    r"\bsubprocess\.|\bos\.killpg\(": {"flowers/processes.py", "flowers/workers.py"},
    r"\bos\.replace\(": {"flowers/files.py"},
}


def test_each_shared_concern_stays_in_its_home():
    import re

    strays = sorted(f"{path.relative_to(PACKAGE.parent)}: {pattern}" for path in PACKAGE.rglob("*.py")
                    for pattern, homes in HOMES.items()
                    if str(path.relative_to(PACKAGE.parent)) not in homes
                    and re.search(pattern, path.read_text()))
    assert strays == []
