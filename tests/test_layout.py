"""The package keeps its shape: parts in folders, dependencies one way, small modules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "session_buddy_realtime"
NAME = "session_buddy_realtime"

# Which parts each part may import (itself always allowed). Top: CLI, plugin, package.
ALLOWED: dict[str, set[str]] = {
    "base": set(),  # errors, protocol, _version
    "hookspecs": set(),
    "watch": {"base"},
    "data": {"base"},
    "scaleout": {"base", "data"},
    "stream": {"base", "data", "scaleout"},
    "host": {"base", "data", "scaleout", "stream", "hookspecs"},
    "top": {"base", "data", "scaleout", "stream", "host", "hookspecs", "watch"},
}
HOST_ONLY_LIBRARIES = {"pluggy", "mcp", "pydantic", "fastmcp"}
MAX_LINES = 400


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join((NAME, *parts)), path


MODULES = dict(_modules())


def _part(module: str) -> str:
    inner = module.split(".")[1:]
    if not inner:
        return "top"
    if inner[0] in {"data", "scaleout", "stream", "host"}:
        return inner[0]
    if inner[0] in {"errors", "protocol", "_version"}:
        return "base"
    if inner[0] in {"hookspecs", "watch"}:
        return inner[0]
    return "top"  # cli, plugin


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file, TYPE_CHECKING blocks included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in MODULES else node.module)
    return names


def _own_imports(path: Path) -> set[str]:
    return {name for name in _imports(path) if name in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependencies_point_one_way(module: str) -> None:
    """Each module imports only its own part and the parts below it (CLI/plugin → host →
    stream → data → protocol/errors; the hookspecs contract imports nothing of ours)."""
    part = _part(module)
    wrong = {
        name
        for name in _own_imports(MODULES[module])
        if _part(name) != part and _part(name) not in ALLOWED[part]
    }
    assert wrong == set(), f"{module} ({part}) may not import {sorted(wrong)}"


def test_no_import_cycle() -> None:
    """The graph of imports between the package's modules has no cycle."""
    graph = {module: _own_imports(path) - {module} for module, path in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        if module in trail:
            cycle = (*trail[trail.index(module) :], module)
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert done == set(graph)


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if _part(m) not in {"host", "hookspecs", "top"})
)
def test_only_the_host_side_imports_pluggy_and_mcp(module: str) -> None:
    """The stream server and the data side know neither the plugin manager nor MCP."""
    used = {name.split(".")[0] for name in _imports(MODULES[module])} & HOST_ONLY_LIBRARIES
    assert used == set(), f"{module} imports {sorted(used)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m) != "scaleout"))
def test_only_scale_out_imports_redis(module: str) -> None:
    """Redis (an optional extra) is known to the scale-out part alone."""
    used = {name.split(".")[0] for name in _imports(MODULES[module])}
    assert "redis" not in used, f"{module} imports redis"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m) == "scaleout"))
def test_redis_is_imported_only_when_used(module: str) -> None:
    """Scale-out modules import ``redis`` inside functions (or for type checking) only, so
    the package imports and runs without the extra installed."""
    tree = ast.parse(MODULES[module].read_text())
    top_level = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(
            name.split(".")[0] == "redis"
            for name in (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
        )
    ]
    assert top_level == [], f"{module} imports redis at module level"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    """No module is over 400 lines: one module, one reason to change."""
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"
