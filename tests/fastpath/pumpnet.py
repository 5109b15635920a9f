"""What the pump tests and the pump benchmark share: two bare datapath nodes
(tests/fastpath_node.py) in namespaces, a datapath on sockets that stand in
for its TUN and its peer (SocketRig), and small socket helpers.

client ns (192.0.2.1) ==veth== connector ns (192.0.2.2; "server" 203.0.113.10 on its lo)
The client maps MAGIC -> TRANSIT with the connector, which maps it to REAL.
The two hold the ends of one WireGuard session (wgsessions.pair), as after a
handshake the client initiated.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import wgsessions
from conn25.fastpath import Datapath
from conn25.lab.netns import Netns, link

NODE = str(Path(__file__).with_name("fastpath_node.py"))
MAGIC, UNASSIGNED, TRANSIT, REAL = "100.80.0.5", "100.80.0.99", "169.254.128.5", "203.0.113.10"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def force_buffers(s: socket.socket, size: int = 16 << 20) -> None:
    """Room for everything a test queues: nothing may be lost on the way."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, size)  # SO_*BUFFORCE
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, plain, size)


def recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One datagram from ``sock``, failing the test if none comes within ``timeout``."""
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, "nothing arrived within the deadline"
    return sock.recv(70000)


class SocketRig:
    """A datapath whose TUN is one end of a datagram socketpair (the test holds the
    other, `kernel`, in the local stack's place) and whose overlay socket and peer (the
    test plays the peer's end of the session on it) are on loopback. `close` stops
    the datapath and closes every socket, for a fixture's finalizer."""

    def __init__(self, dp: Datapath) -> None:
        self.kernel, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.overlay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.overlay.bind(("127.0.0.1", 0))
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.dp = dp

    def close(self) -> None:
        self.dp.stop()
        for s in (self.kernel, self.tun, self.overlay, self.peer):
            s.close()


def rig_fixture(make: Callable[[], SocketRig]) -> Callable[[], Iterator[SocketRig]]:
    """A pytest fixture giving each test a fresh ``make()``, closed after it."""

    @pytest.fixture
    def rig() -> Iterator[SocketRig]:
        r = make()
        try:
            yield r
        finally:
            r.close()

    return rig


def start_node(ns: Netns, cfg: dict) -> subprocess.Popen:
    p = ns.popen(sys.executable, NODE, json.dumps(cfg), stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([p.stdout], [], [], 20)
    line = p.stdout.readline() if ready else ""
    if line.strip() != "ready":
        p.kill()
        raise AssertionError(f"node did not start: {line!r} {p.communicate()[1]}")
    return p


def node_counters(p: subprocess.Popen) -> dict:
    """A running node's counters (it answers a "counters" line with one JSON line)."""
    p.stdin.write("counters\n")
    p.stdin.flush()
    ready, _, _ = select.select([p.stdout], [], [], 10)
    assert ready, "the node did not answer"
    return json.loads(p.stdout.readline())


def stop_node(p: subprocess.Popen) -> dict:
    """Stop a node (close its stdin); its counters and events."""
    out, err = p.communicate("", timeout=20)
    if p.returncode != 0:
        raise AssertionError(f"node failed: {err}")
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def pump_topology(tun: str = "plain", sockbuf: int = 4 << 20) -> Iterator[
        tuple[Netns, Netns, subprocess.Popen, subprocess.Popen]]:
    """(client ns, connector ns, client node, connector node); all removed on exit.

    `tun`: "plain" (no virtio-net header), "vnet" (the header, and writes coalesced into
    super-packets: what the daemon does) or "offload" ("vnet" and TSO/USO super-packets
    on reads, the daemon's --tun-offload). `sockbuf`: the overlay sockets' buffers
    (Datapath.start's sockbuf)."""
    if tun not in ("plain", "vnet", "offload"):
        raise ValueError(f"tun must be plain, vnet or offload, got {tun!r}")
    mode = {"vnet_hdr": tun != "plain", "tun_offload": tun == "offload", "sockbuf": sockbuf}
    client, connector = Netns("client"), Netns("conn")
    client_kp, connector_kp = wgsessions.pair()
    try:
        link(client, "192.0.2.1/24", connector, "192.0.2.2/24")
        connector.run("ip", "addr", "add", f"{REAL}/32", "dev", "lo")
        c = start_node(client, {
            "tun": "c25", "addresses": ["100.64.0.1"], "routes": ["100.80.0.0/16", "100.64.0.2/32"],
            "client": True, "listen": "192.0.2.1", "port": 41641,
            "peers": [{"id": 2, "endpoint": "192.0.2.2", "port": 41641, "overlay": ["100.64.0.2"],
                       "keypair": wgsessions.node_keypair(client_kp)}],
            "magic": [[MAGIC, TRANSIT, 2]], "magic_ranges": ["100.80.0.0/16"], **mode,
        })
        k = start_node(connector, {
            "tun": "c25", "addresses": ["100.64.0.2"], "routes": ["100.64.0.1/32"],
            "connector": True, "listen": "192.0.2.2", "port": 41641,
            "peers": [{"id": 1, "endpoint": "192.0.2.1", "port": 41641, "overlay": ["100.64.0.1"],
                       "keypair": wgsessions.node_keypair(connector_kp)}],
            "transit": [[1, TRANSIT, REAL]], "transit_ranges": ["169.254.128.0/17"],
            **mode,
        })
        yield client, connector, c, k
    finally:
        client.close()
        connector.close()
