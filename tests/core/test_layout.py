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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
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


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_modules_do_no_io(path):
    assert io_of(path.read_text()) == []


@pytest.mark.parametrize("source", [
    "import time\n", "from socket import socket\n", "from .. import fastpath\n",
    "def f():\n    import trio\n", "from ..daemon import node\n",
    "def f(p):\n    return open(p)\n", "import conn25._fastpath\n",
])
def test_the_rule_catches_what_it_forbids(source):
    assert io_of(source) != []
