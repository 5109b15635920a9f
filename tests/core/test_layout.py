"""The tree is the architecture: the core does no I/O, and no module imports
itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
CORE = SRC / "conn25" / "core"

# What a core module may not import: sockets, threads, the clock, the event loop,
# netlink, processes, files and logs (it reports through callbacks), and the
# datapath or the shell.
FORBIDDEN = {
    "asyncio", "datetime", "fcntl", "logging", "os", "pyroute2", "select", "selectors",
    "shutil", "signal", "socket", "subprocess", "threading", "time", "trio",
    "conn25._fastpath", "conn25.fastpath", "conn25.daemon", "conn25.lab",
}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, package: str) -> set[str]:
    """Every module that `source` (a module of `package`) imports, at any depth of
    its code, as absolute names (for `from a import b`: both `a` and `a.b`)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def io_of(source: str, package: str = "conn25.core") -> list[str]:
    """What in `source` breaks the core's rule: forbidden imports, calls of open()."""
    found = sorted(m for m in imports(source, package)
                   if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    found += [f"open() at line {node.lineno}" for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "open"]
    return found


# rglob: the core's subpackages (wireguard/) are held to the same rule.
@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(CORE)))
def test_core_modules_do_no_io(path):
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    assert io_of(path.read_text(), package) == []


@pytest.mark.parametrize("source", [
    "import time\n", "from socket import socket\n", "from .. import fastpath\n",
    "def f():\n    import trio\n", "from ..daemon import node\n",
    "def f(p):\n    return open(p)\n", "import conn25._fastpath\n",
])
def test_the_rule_catches_what_it_forbids(source):
    assert io_of(source) != []


# -- no import cycles ----------------------------------------------------------------

PACKAGE = SRC / "conn25"


def import_graph(root: Path = PACKAGE, src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the modules of `root` it imports, counting every import: at the top,
    inside functions and under TYPE_CHECKING (a cycle there still ties the two together)."""
    paths = {module_name(p, src): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in imports(path.read_text(), package)
                       if m in paths and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    group of modules that import each other (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle(graph, group) for group in groups]


def _a_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A path inside `group` from its first module back to it (breadth first: a shortest)."""
    start = min(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is no cycle")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "conn25.daemon.node" in graph and "conn25.core.config" in graph
    assert cycles(graph) == [], "import cycles: " + "; ".join(
        " -> ".join(c) for c in cycles(graph))


@pytest.mark.parametrize(("sources", "expected"), [
    # Each module's source, as files under a package "p".
    ({"a": "from . import b\n", "b": "from .a import x\n"}, [["p.a", "p.b", "p.a"]]),
    ({"a": "def f():\n    from . import b\n", "b": "import p.c\n",
      "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"},
     [["p.a", "p.b", "p.c", "p.a"]]),
    ({"a": "from . import b\n", "b": "import json\n"}, []),
])
def test_the_cycle_check_finds_cycles_through_any_kind_of_import(tmp_path, sources, expected):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, source in sources.items():
        (pkg / f"{name}.py").write_text(source)
    assert cycles(import_graph(pkg, tmp_path)) == expected
