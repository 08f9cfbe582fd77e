"""The package's layering, checked on its source: no import cycle between modules or between
top-level folders (lazy imports inside functions included; imports only for type checkers
excluded, since they never run), every folder imports only from the layers before it, no
module grows past the size a reader can hold, and ``import loopscope`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SOURCE_PACKAGE

PACKAGE = SOURCE_PACKAGE

#: Layers in the order data flows; a module may import its own layer or an earlier one.
LAYERS: dict[str, float] = {
    "core": 0,
    "nn": 1,
    "data": 1,
    "engine": 2,
    "families": 3,
    "": 3.5,  # the package root: loopscope.load, which walks the families table
    "analysis": 4,
    "trace": 5,
    "report": 6,
    "pipeline": 7,
    "training": 7,
    "studies": 8,
    "cli": 9,
}
MAX_MODULE_LINES = 650


def module_name(path: Path) -> str:
    parts = ("loopscope", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str) -> set[str]:
    """The loopscope modules ``name`` imports, a submodule named in ``from X import sub``
    counted as that submodule."""
    deps: set[str] = set()
    for node in _import_nodes(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}".rstrip(".")
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        deps.update(t for t in targets if t in MODULES and t != name)
    return deps


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of size > 1, or with a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
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
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_cycle_finder_finds_a_known_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_import_walker_sees_lazy_imports_and_skips_type_checking(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from loopscope.cli.main import main\n"
        "def f():\n    from loopscope.engine import loop\n"
    )
    found = {
        (n.module, tuple(a.name for a in n.names))
        for n in _import_nodes(ast.parse(source))
        if isinstance(n, ast.ImportFrom)
    }
    assert ("loopscope.engine", ("loop",)) in found
    assert ("loopscope.cli.main", ("main",)) not in found


def test_no_import_cycle_between_modules() -> None:
    assert strongly_connected(GRAPH) == []


def test_no_import_cycle_between_top_level_folders() -> None:
    folders: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        own = layer_of(name)
        folders.setdefault(own, set()).update(layer_of(d) for d in deps if layer_of(d) != own)
    assert strongly_connected(folders) == []


def test_every_folder_imports_only_from_earlier_layers() -> None:
    assert set(map(layer_of, MODULES)) <= set(LAYERS), "a new top-level folder needs a layer"
    upward = sorted(
        f"{name} -> {dep}"
        for name, deps in GRAPH.items()
        for dep in deps
        if LAYERS[layer_of(dep)] > LAYERS[layer_of(name)]
    )
    assert upward == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_stays_readable(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines; split it by responsibility"


def test_import_loopscope_is_light() -> None:
    code = (
        "import sys, loopscope\n"
        "names = ('torch', 'matplotlib', 'transformers', 'numpy')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_root_facade_resolves_pipeline_functions_without_importing_them() -> None:
    """``loopscope.open_trace`` is ``loopscope.pipeline.open_trace``, reached by name on first
    use (not an upward import), and ``import loopscope`` does not load the pipeline."""
    import loopscope
    from loopscope import pipeline

    assert set(loopscope.FACADE.values()) == {"loopscope.pipeline"}
    for name in loopscope.FACADE:
        assert getattr(loopscope, name) is getattr(pipeline, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = loopscope.nope  # type: ignore[attr-defined]
    code = "import sys, loopscope; print('loopscope.pipeline' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
