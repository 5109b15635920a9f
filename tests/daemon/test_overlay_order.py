"""The WireGuard driver (conn25.daemon.overlay) on a stand-in datapath and socket: the order
of what it does (test_overlay.py drives it between two real datapaths).

No root, no network: what matters here is the order of what the driver does.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace
from typing import Any

from conn25.core.wireguard import keys
from conn25.core.wireguard.device import Device
from conn25.daemon.overlay import Overlay

ENDPOINT = ("192.0.2.2", 41641)


class Recorder:
    """The datapath and the socket in one: every call it sees, in order."""

    family = socket.AF_INET

    def __init__(self, handshakes: list[tuple[bytes, tuple[str, int]]]) -> None:
        self.handshakes = handshakes
        self.calls: list[str] = []

    # OverlayDatapath
    def read_handshakes(self) -> tuple[list[tuple[bytes, tuple[str, int] | None]], int]:
        out, self.handshakes = list(self.handshakes), []
        return out, 0  # type: ignore[return-value]

    def install_keypair(self, peer: int, **kw: Any) -> None:
        self.calls.append("install_keypair")

    def set_endpoint(self, peer: int, endpoint: tuple[str, int], now_ms: int) -> bool:
        self.calls.append("set_endpoint")
        return True

    def seal(self, peer: int, packet: bytes, now_ms: int) -> None:
        self.calls.append("seal")

    def take_staged(self, peer: int) -> list[bytes]:
        return []

    def peer_state(self, peer: int) -> None:
        return None

    # the socket
    def sendto(self, data: bytes, endpoint: tuple[str, int]) -> int:
        self.calls.append(f"sendto type {data[0]}")
        return len(data)


class NoRefusals:
    def refuse(self, *a: object, **kw: object) -> None:
        raise AssertionError(f"refused: {a}")


def test_a_responder_installs_its_keypair_before_the_response_leaves():
    """The initiator sends data the moment our response reaches it; if the keypair is
    not in the datapath by then, that data is dropped as under an unknown index (the
    first ping of a wireguard-go peer was lost so, and a second handshake started)."""
    ours, theirs = keys.generate_private(), keys.generate_private()
    initiator = Device(theirs)
    peer = initiator.add_peer(keys.public_from_private(ours))
    initiation = peer.begin_handshake(time.monotonic(), time.time())
    rec = Recorder([(initiation, ENDPOINT)])
    overlay = Overlay(rec, rec, ours, lambda name: 7, NoRefusals())  # type: ignore[arg-type]
    cfg = SimpleNamespace(
        node=SimpleNamespace(persistent_keepalive=0),
        peers=[SimpleNamespace(name="theirs", public_key=keys.public_from_private(theirs))])
    overlay.configure(cfg)  # type: ignore[arg-type]
    overlay.handle_handshakes()
    assert "sendto type 2" in rec.calls, rec.calls  # a handshake response went out
    assert rec.calls.index("install_keypair") < rec.calls.index("sendto type 2"), rec.calls
    assert rec.calls.index("set_endpoint") < rec.calls.index("sendto type 2"), rec.calls


class OneEndpoint(Recorder):
    """A datapath whose one peer is at `endpoint` and has no session."""

    def __init__(self, endpoint: tuple[str, int]) -> None:
        super().__init__([])
        self.endpoint = endpoint

    def peer_state(self, peer: int) -> dict[str, Any]:  # type: ignore[override]
        return {"endpoint": self.endpoint, "sessions": {}, "last_tx_ms": 0,
                "tx_unanswered_ms": 0, "rx_unanswered_ms": 0}


def test_a_dual_stack_socket_reaches_an_ipv4_endpoint():
    """A node without an endpoint of its own binds [::] for both families (node.py); its
    handshakes to an IPv4 peer must leave that socket too (as a v4-mapped address, which
    is what the datapath does for transport data), not fail as an address of the wrong
    family. The peer here is an IPv4 socket on the loopback."""
    ours, theirs = keys.generate_private(), keys.generate_private()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        sender.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sender.bind(("::", 0))
        dp = OneEndpoint(receiver.getsockname())
        overlay = Overlay(dp, sender, ours, lambda name: 7, NoRefusals())  # type: ignore[arg-type]
        cfg = SimpleNamespace(
            node=SimpleNamespace(persistent_keepalive=0),
            peers=[SimpleNamespace(name="theirs", public_key=keys.public_from_private(theirs))])
        overlay.configure(cfg)  # type: ignore[arg-type]
        overlay.handshake_wanted(7)
        overlay.tick()
        assert overlay.counters["send_errors"] == 0, overlay.counters
        assert overlay.counters["initiations"] == 1, overlay.counters
        data, _ = receiver.recvfrom(2048)
        assert data[0] == 1 and len(data) == 148  # a handshake initiation
    finally:
        receiver.close()
        sender.close()
