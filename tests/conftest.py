"""What every test room shares.

Rooms: ``core/`` (the sans-IO core, no root), ``fastpath/`` (the compiled
datapath: in memory without root, its pumps on real TUN devices with root),
``daemon/`` (the trio shell: in process, and end to end in network
namespaces with root), ``fuzz/`` (bounded fuzz targets of every parser),
``packaging/`` (the wheel of packaging/build-wheels; the demo from it with root).

Tests marked ``root`` need root, network namespaces and /dev/net/tun; where
the machine has not got them they are skipped, saying why. This directory is
on ``sys.path`` (pytest puts a conftest's directory there), so helpers such
as ``dnswire`` are imported by name.
"""

from __future__ import annotations

import pytest

from conn25.lab.netns import need_root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = need_root()
    if why is None:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
