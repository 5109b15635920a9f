"""The WireGuard driver between two real datapaths (no pumps, no root): handshake messages
travel on real UDP sockets on the loopback, transport data through ``process_datagram``.
What it pins: a packet with no session waits and leaves once the handshake completes, the
responder's session is confirmed by the initiator's first message, and a stranger's or a
garbled handshake message changes nothing but a counter."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio
from scapy.layers.inet import ICMP, IP

from conn25.core import policy
from conn25.core.config import NodeConfig
from conn25.core.tailnet import load_bytes
from conn25.core.wireguard import keys
from conn25.daemon.dataplane import Dataplane, Ids
from conn25.daemon.overlay import Overlay
from conn25.fastpath import Datapath, EventKind, monotonic_ms
from nodekeys import private_key, public_key_text

A4, B4 = "100.64.0.1", "100.64.0.2"


class Refusals:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def refuse(self, source: str, reason: str, detail: str, count: int = 1,
               level: int | None = None) -> None:
        self.seen.append((source, reason))


@dataclass
class Side:
    name: str
    dp: Datapath
    sock: socket.socket
    overlay: Overlay
    refusals: Refusals
    cfg: NodeConfig

    def deliver(self) -> list[tuple[str, bytes]]:
        """Every datagram waiting on this side's socket, through its datapath; then the
        driver handles what the datapath queued and reported."""
        out = []
        while True:
            try:
                data, sender = self.sock.recvfrom(2048)
            except BlockingIOError:
                break
            verdict, inner, _ = self.dp.process_datagram(data, sender, monotonic_ms())
            out.append((verdict, inner))
        self.overlay.handle_handshakes()
        for ev in self.dp.read_events():
            if ev.kind is EventKind.HANDSHAKE_WANTED:
                self.overlay.handshake_wanted(ev.peer)
            elif ev.kind is EventKind.SESSION_CONFIRMED:
                self.overlay.confirmed(ev.peer)
        return out


def tailnet(ports: dict[str, int]) -> bytes:
    nodes = [
        {"name": "a", "user": "alice@example.com", "addresses": [A4],
         "endpoint": f"127.0.0.1:{ports['a']}", "publicKey": public_key_text("a")},
        {"name": "b", "user": "bob@example.com", "addresses": [B4],
         "endpoint": f"127.0.0.1:{ports['b']}", "publicKey": public_key_text("b")},
    ]
    return repr({"nodes": nodes}).replace("'", '"').encode()


@pytest.fixture
def sides() -> Iterator[dict[str, Side]]:
    socks = {}
    for name in ("a", "b"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks[name] = s
    tn = load_bytes(tailnet({n: s.getsockname()[1] for n, s in socks.items()}))
    out = {}
    for name, s in socks.items():
        cfg = policy.node_config(tn, name, False)
        dp = Datapath(client=True, connector=False)
        ids = Ids()
        Dataplane(dp.tables, ids).install_config(cfg)
        refusals = Refusals()
        overlay = Overlay(dp, s, private_key(name), ids.peer, refusals)
        overlay.configure(cfg)
        out[name] = Side(name, dp, s, overlay, refusals, cfg)
    yield out
    for s in socks.values():
        s.close()


def establish(a: Side, b: Side) -> int:
    """A session between a and b, a initiating and confirming it with a keepalive; a's
    peer id of b."""
    peer = a.dp.tables.lookup_route(ipaddress.ip_address(B4))
    a.overlay.handshake_wanted(peer)
    a.overlay.tick()
    b.deliver()
    a.deliver()
    assert a.overlay.counters["keepalives_sent"] == 1
    assert b.deliver() == [("drop", b"")]  # the keepalive: nothing for the TUN
    return peer


def ping(src: str, dst: str) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(id=7, seq=1) / b"overlay test")


def test_a_packet_waits_for_the_handshake_and_then_arrives(sides):
    a, b = sides["a"], sides["b"]
    pkt = ping(A4, B4)
    verdict, out, peer = a.dp.process_from_tun(pkt, monotonic_ms())
    assert verdict == "peer"
    assert a.dp.seal(peer, out, monotonic_ms()) is None  # no session: staged
    assert a.dp.peer_state(peer)["staged"] == 1
    a.deliver()  # the datapath asked for a handshake
    a.overlay.tick()  # ... which the timers start: an initiation leaves
    assert a.overlay.counters["initiations"] == 1
    assert b.deliver() == [("handshake", b"")]  # b answers it
    assert b.overlay.counters["responses"] == 1
    assert a.deliver() == [("handshake", b"")]  # a installs the session, sends what waited
    assert a.overlay.counters["staged_sent"] == 1 and a.dp.peer_state(peer)["staged"] == 0
    assert b.deliver() == [("tun", pkt)]  # the packet, decrypted, for b's TUN
    [state] = [p for p in b.overlay.peers() if p["name"] == "a"]
    assert state["latestHandshake"] is not None and state["rxBytes"] > 0
    # The responder's session was confirmed by it: b can send to a now.
    b_to_a = b.dp.tables.lookup_route(ipaddress.ip_address(A4))
    sealed = b.dp.seal(b_to_a, ping(B4, A4), monotonic_ms())
    assert sealed is not None
    a.sock.sendto(sealed[0], a.sock.getsockname())  # as if from b: roaming is allowed
    assert [v for v, _ in a.deliver()] == ["tun"]


def test_handshake_messages_from_strangers_or_garbled_change_nothing(sides):
    a, b = sides["a"], sides["b"]
    a.deliver()
    peer = a.dp.tables.lookup_route(ipaddress.ip_address(B4))
    a.overlay.handshake_wanted(peer)
    a.overlay.tick()
    init, _ = b.sock.recvfrom(2048)
    garbled = bytearray(init)
    garbled[100] ^= 1
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.sendto(bytes(garbled), b.sock.getsockname())
        stranger.sendto(b"\x01\x00\x00\x00" + bytes(144), b.sock.getsockname())
        assert [v for v, _ in b.deliver()] == ["handshake", "handshake"]
    finally:
        stranger.close()
    assert b.overlay.counters["handshakes_rejected"] == 2
    assert [r for _, r in b.refusals.seen] == ["handshake_rejected"] * 2
    assert b.overlay.counters["responses"] == 0
    assert all(p["latestHandshake"] is None for p in b.overlay.peers())


def test_a_reconfigure_keeps_a_peer_whose_key_stayed_and_replaces_one_whose_key_changed(sides):
    a = sides["a"]
    [peer] = a.overlay.device.peers.values()
    a.overlay.configure(a.cfg)
    assert list(a.overlay.device.peers.values()) == [peer]  # same object: sessions kept
    new_key = public_key_text("b, rotated")
    doc = tailnet({"a": 1, "b": 2}).replace(public_key_text("b").encode(), new_key.encode())
    a.overlay.configure(policy.node_config(load_bytes(doc), "a", False))
    [replaced] = a.overlay.device.peers.values()
    assert replaced is not peer and keys.encode(replaced.remote_static) == new_key
    assert [p["publicKey"] for p in a.overlay.peers()] == [new_key]


def test_the_driver_runs_in_a_nursery_until_cancelled(sides):
    a = sides["a"]
    ran: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.overlay.run)
            ran.append(a.overlay.tick())
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(ran) == 1 and ran[0] > 0


def test_under_a_handshake_flood_cookies_are_demanded_and_sessions_keep_flowing(sides):
    a, b = sides["a"], sides["b"]
    peer = establish(a, b)
    # A flood: one valid-looking initiation (mac1 right; anyone who knows b's public key
    # can make one) queued far more often than a node under no load ever sees.
    a.overlay.handshake_wanted(peer)  # a rekey
    b.overlay.counters.clear()
    a.overlay.tick()
    init, sender = b.sock.recvfrom(2048)
    now = monotonic_ms()
    for _ in range(200):
        assert b.dp.process_datagram(init, sender, now)[0] == "handshake"
    b.overlay.handle_handshakes()
    assert b.overlay.counters["under_load"] == 1
    # Every one of them was answered with a cookie reply (cheap: no Diffie-Hellman), none
    # with a response; the datapath's queue kept none of them.
    assert b.overlay.counters["cookie_replies"] == 200
    assert b.overlay.counters["responses"] == 0
    assert b.dp.read_handshakes() == ([], 0)
    # Meanwhile the established session carries data as before.
    pkt = ping(A4, B4)
    sealed = a.dp.seal(peer, a.dp.process_from_tun(pkt, monotonic_ms())[1], monotonic_ms())
    assert sealed is not None
    a.sock.sendto(sealed[0], b.sock.getsockname())
    assert [v for v, _ in b.deliver()] == ["tun"]


def test_a_peer_whose_key_changed_loses_its_sessions_at_once(sides):
    a, b = sides["a"], sides["b"]
    peer = establish(a, b)
    b_to_a = b.dp.tables.lookup_route(ipaddress.ip_address(A4))
    sealed = b.dp.seal(b_to_a, ping(B4, A4), monotonic_ms())
    assert sealed is not None and "current" in a.dp.peer_state(peer)["sessions"]
    # b's key is replaced in the file (stolen laptop): a must not accept the old sessions.
    doc = tailnet({"a": 1, "b": 2}).replace(public_key_text("b").encode(),
                                             public_key_text("b, new").encode())
    a.overlay.configure(policy.node_config(load_bytes(doc), "a", False))
    assert a.dp.peer_state(peer)["sessions"] == {}
    before = a.dp.counters()["drop_unknown_index"]
    assert a.dp.process_datagram(sealed[0], b.sock.getsockname(), monotonic_ms())[0] == "drop"
    assert a.dp.counters()["drop_unknown_index"] == before + 1
