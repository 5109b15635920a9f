"""pyroute2's IPRoute, the one netlink API the node uses, without the rest of pyroute2."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any


def _pyroute2_package() -> None:
    """Make ``pyroute2`` importable without running its package ``__init__``.

    That ``__init__`` imports every API pyroute2 has (NDB, IPDB, conntrack,
    ipset, devlink, ...: 70 modules more than IPRoute needs, about 4 MiB of a
    running node). The package is registered empty; whoever asks it for a
    name it lacks (``from pyroute2 import NFCTSocket``) gets the real
    ``__init__`` run then, so other users see the whole API.
    """
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed")
    pkg = importlib.util.module_from_spec(spec)

    def full_api(name: str) -> Any:
        try:  # a submodule (`from pyroute2 import config`, as pyroute2 does itself)
            return importlib.import_module(f"pyroute2.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pyroute2.{name}":
                raise
        del pkg.__dict__["__getattr__"]  # (the real __init__ asks for its own names)
        spec.loader.exec_module(pkg)  # type: ignore[union-attr]
        return getattr(pkg, name)

    pkg.__dict__["__getattr__"] = full_api
    sys.modules["pyroute2"] = pkg


_pyroute2_package()

from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError"]
