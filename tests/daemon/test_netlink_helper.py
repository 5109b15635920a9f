"""The netlink helper process (conn25.daemon.netlink_helper): IPRoute's answers
and errors come back through the pipe, the child ends with its session, and
the resident node does not import pyroute2 at all.

Only reads here (no root needed); the changes it makes are covered by
test_system.py, which drives SystemSetup in namespaces.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest

from conn25.daemon.netlink_helper import Netlink, NetlinkError


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_answers_are_the_kernels() -> None:
    lo = socket.if_nametoindex("lo")
    with Netlink() as nl:
        assert nl.link_lookup(ifname="lo") == [lo]
        (link,) = nl.link("get", index=lo)
        assert link["index"] == lo
        assert link.get_attr("IFLA_IFNAME") == "lo"
        assert link.get_attr("IFLA_NO_SUCH_ATTRIBUTE") is None
        routes = nl.route("dump", table=255)  # the local table: lo's 127.0.0.1 at least
        assert any(r.get_attr("RTA_DST") == "127.0.0.1" for r in routes)


def test_kernel_errors_keep_their_errno_and_the_session_goes_on() -> None:
    unused = max(i for i, _ in socket.if_nameindex()) + 1000
    with Netlink() as nl:
        with pytest.raises(NetlinkError) as e:
            nl.link("get", index=unused)
        assert e.value.code == errno.ENODEV
        assert nl.link_lookup(ifname="lo") == [socket.if_nametoindex("lo")]


def test_only_iproute_methods_are_served() -> None:
    with Netlink() as nl, pytest.raises(ValueError, match="no method 'flush_routes'"):
        nl._call("flush_routes", (), {})


def test_the_child_ends_with_the_session() -> None:
    nl = Netlink()
    assert nl.pid is None  # started by the first call, not before
    nl.link_lookup(ifname="lo")
    pid = nl.pid
    assert pid is not None and not _gone(pid)
    nl.close()
    assert nl.pid is None and _gone(pid)
    nl.close()  # idempotent


def test_a_dead_child_is_an_error_that_names_it() -> None:
    with Netlink() as nl:
        nl.link_lookup(ifname="lo")
        assert nl.pid is not None
        os.kill(nl.pid, 9)
        with pytest.raises(OSError, match=r"netlink helper .* ended: exit status -9"):
            nl.link_lookup(ifname="lo")
        assert nl.link_lookup(ifname="lo")  # the next call starts a new child


def test_the_node_does_not_import_pyroute2() -> None:
    """What `conn25d up` imports stays free of pyroute2 and what it brings
    (asyncio, multiprocessing, unittest): about 6 MiB of every node."""
    code = ("import sys, conn25.daemon.cli, conn25.daemon.node\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert "trio" in out  # the probe did import the node
    assert not {"pyroute2", "asyncio", "multiprocessing", "unittest"} & set(out)
