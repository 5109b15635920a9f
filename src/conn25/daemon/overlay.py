"""The WireGuard driver: a trio task that owns the node's handshake state machine.

The core (``conn25.core.wireguard``) decides every handshake and timer; the datapath seals
and opens transport data and holds the sessions' counters. This module carries bytes and
times between them: handshake messages the pumps queued go to ``Device.receive``, the
replies and initiations go out on the overlay's UDP socket, the keypairs a handshake yields
go into the datapath, and the datapath's activity stamps drive each peer's timers.

What a sender can cause per datagram (a rejected handshake message) is counted and goes
through the refusal log (a summary per source), never a line per datagram.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..core.config import NodeConfig
from ..core.wireguard import keys
from ..core.wireguard.device import Device, Received
from ..core.wireguard.errors import Rejected
from ..core.wireguard.peer import Activity, GaveUp, Keepalive, Peer, Send

__all__ = ["Overlay"]

log = logging.getLogger("conn25d.overlay")

# Handshake messages waiting in the datapath's queue (1024) from which on the node counts as
# under load: cookies are demanded and handshakes rate-limited per source (wireguard-go's
# threshold, an eighth of its queue).
UNDER_LOAD = 128
TICK_MAX = 1.0  # the timers look at the datapath's stamps at least this often


class OverlayDatapath(Protocol):
    """What the driver uses of ``conn25.fastpath.Datapath``."""

    def read_handshakes(self) -> tuple[list[tuple[bytes, tuple[str, int] | None]], int]: ...
    def install_keypair(self, peer: int, *, local_index: int, remote_index: int,
                        send_key: bytes, receive_key: bytes, initiator: bool,
                        created_ms: int, as_next: bool) -> None: ...
    def seal(self, peer: int, packet: bytes, now_ms: int) -> tuple[bytes, Any] | None: ...
    def take_staged(self, peer: int) -> list[bytes]: ...
    def clear_sessions(self, peer: int) -> bool: ...
    def set_endpoint(self, peer: int, endpoint: tuple[str, int], now_ms: int) -> bool: ...
    def peer_state(self, peer: int) -> dict[str, Any] | None: ...


class Refusals(Protocol):
    def refuse(self, source: str, reason: str, detail: str, count: int = 1,
               level: int | None = None) -> None: ...


@dataclass
class _Known:
    name: str
    peer: Peer
    handshakes: int = 0
    latest_handshake: float | None = None  # Unix time of the latest completed handshake


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _seconds(ms: int) -> float | None:
    return ms / 1000 if ms else None


class Overlay:
    """One node's WireGuard side. ``configure`` with each configuration; ``run`` in the
    node's nursery; ``handle_handshakes`` and the ``handshake_wanted``/``confirmed`` calls
    when the datapath's event fd fired."""

    def __init__(self, datapath: OverlayDatapath, sock: socket.socket, private_key: bytes,
                 peer_id: Callable[[str], int], refusals: Refusals, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._dp = datapath
        self._sock = sock
        self.device = Device(private_key)
        self._peer_id = peer_id
        self._refusals = refusals
        self._clock = clock
        self._wall = wall
        self._known: dict[int, _Known] = {}
        self._by_peer: dict[Peer, int] = {}
        self._wake = trio.Event()
        self.counters: Counter[str] = Counter()

    @property
    def public_key(self) -> bytes:
        return self.device.identity.public

    def configure(self, cfg: NodeConfig) -> None:
        """Peers of ``cfg``: new keys get a fresh peer, gone ones are forgotten, the rest
        keep their sessions."""
        keepalive = float(cfg.node.persistent_keepalive)
        wanted: dict[int, tuple[str, bytes]] = {
            self._peer_id(m.name): (m.name, m.public_key) for m in cfg.peers}
        for pid in list(self._known):
            known = self._known[pid]
            if pid not in wanted or wanted[pid][1] != known.peer.remote_static:
                self.device.remove_peer(known.peer.remote_static)
                del self._by_peer[known.peer]
                del self._known[pid]
                # A new key: nothing sealed under the old one's sessions counts any more.
                self._dp.clear_sessions(pid)
        for pid, (name, public) in wanted.items():
            if pid in self._known:
                self._known[pid].name = name
                self._known[pid].peer.persistent_keepalive = keepalive
                continue
            peer = self.device.add_peer(public, persistent_keepalive=keepalive)
            self._known[pid] = _Known(name, peer)
            self._by_peer[peer] = pid
        self._wake.set()

    # -- what the datapath reported ----------------------------------------------------

    def handle_handshakes(self) -> None:
        messages, waiting = self._dp.read_handshakes()
        under_load = waiting >= UNDER_LOAD
        if under_load:
            self.counters["under_load"] += 1
        for data, sender in messages:
            if sender is not None:
                self._receive(data, sender, under_load)

    def handshake_wanted(self, pid: int) -> None:
        known = self._known.get(pid)
        if known is not None:
            known.peer.want_handshake()
            self._wake.set()

    def unknown_session(self, address: bytes, port: int) -> None:
        """Data under no session of ours came from address:port. If that is where a peer we
        have no session with is, it probably restarted (and keeps sending under the session
        it had): a handshake now, rather than after its own 15 s without an answer. Forgeable,
        but it costs at most one initiation per peer per REKEY_TIMEOUT."""
        endpoint = (str(ipaddress.ip_address(address)), port)
        for pid, known in self._known.items():
            state = self._dp.peer_state(pid)
            if (state is not None and state["endpoint"] == endpoint
                    and "current" not in state["sessions"] and not known.peer.handshaking):
                self.counters["handshakes_for_unknown_session"] += 1
                known.peer.want_handshake()
                self._wake.set()

    def confirmed(self, pid: int) -> None:
        known = self._known.get(pid)
        state = self._dp.peer_state(pid)
        if known is None or state is None or "current" not in state["sessions"]:
            return
        known.peer.confirmed(state["sessions"]["current"]["local_index"])
        # What waited for a session (we had asked for one too) can go on this one.
        self._flush(pid, int(self._clock() * 1000))
        self._wake.set()

    def _receive(self, data: bytes, sender: tuple[str, int], under_load: bool) -> None:
        host, port = sender
        source = ipaddress.ip_address(host).packed + port.to_bytes(2, "big")
        now = self._clock()
        try:
            r = self.device.receive(data, source, now, under_load)
        except Rejected as e:
            self.counters["handshakes_rejected"] += 1
            self._refusals.refuse(host, "handshake_rejected", str(e))
            return
        # The keypair goes into the datapath before the response leaves: the initiator
        # sends data the moment the response reaches it, and data that arrives before its
        # keypair is dropped as under an unknown index.
        if r.keypair is not None and r.peer is not None:
            self._established(r, sender, now)
        if r.reply is not None:
            self._send(r.reply, sender, "cookie_replies" if r.keypair is None else "responses")

    def _established(self, r: Received, sender: tuple[str, int], now: float) -> None:
        assert r.keypair is not None and r.peer is not None
        pid = self._by_peer[r.peer]
        known = self._known[pid]
        kp = r.keypair
        now_ms = int(now * 1000)
        # The handshake authenticated the sender: that is where the peer is now.
        self._dp.set_endpoint(pid, sender, now_ms)
        self._dp.install_keypair(pid, local_index=kp.local_index, remote_index=kp.remote_index,
                                 send_key=kp.send_key, receive_key=kp.receive_key,
                                 initiator=kp.is_initiator, created_ms=int(kp.created * 1000),
                                 as_next=not kp.is_initiator)
        known.handshakes += 1
        known.latest_handshake = self._wall()
        self.counters["handshakes_completed"] += 1
        (log.info if known.handshakes == 1 else log.debug)(
            "handshake with %s (%s) complete, endpoint %s:%d", known.name,
            keys.encode(r.peer.remote_static), *sender)
        # What waited for this session goes now; the initiator confirms it with a keepalive
        # otherwise. (A responder sends on it once the initiator's first message came.)
        if kp.is_initiator and not self._flush(pid, now_ms):
            self._seal_and_send(pid, b"", now_ms, "keepalives_sent")
        self._wake.set()

    # -- sending ------------------------------------------------------------------------

    def _flush(self, pid: int, now_ms: int) -> int:
        """Send the packets staged for ``pid``; how many there were."""
        staged = self._dp.take_staged(pid)
        for packet in staged:
            self._seal_and_send(pid, packet, now_ms, "staged_sent")
        return len(staged)

    def _send(self, data: bytes, endpoint: tuple[str, int], what: str) -> None:
        host, port = endpoint
        if self._sock.family == socket.AF_INET6 and ":" not in host:
            # A node without an endpoint of its own has one dual-stack socket ([::]), on
            # which an IPv4 peer is a v4-mapped address (the datapath sends so too).
            endpoint = (f"::ffff:{host}", port)
        try:
            self._sock.sendto(data, endpoint)
        except OSError:
            self.counters["send_errors"] += 1
        else:
            self.counters[what] += 1

    def _seal_and_send(self, pid: int, packet: bytes, now_ms: int, what: str) -> bool:
        sealed = self._dp.seal(pid, packet, now_ms)
        if sealed is None:
            return False
        data, endpoint = sealed
        self._send(data, endpoint, what)
        return True

    def _act(self, pid: int, known: _Known, action: Send | Keepalive | GaveUp,
             now: float) -> None:
        if isinstance(action, GaveUp):
            dropped = len(self._dp.take_staged(pid))
            self.counters["handshakes_given_up"] += 1
            self.counters["staged_dropped"] += dropped
            log.info("no handshake with %s for 90 s: dropped %d waiting packets", known.name,
                     dropped)
            return
        if isinstance(action, Keepalive):
            if not self._seal_and_send(pid, b"", int(now * 1000), "keepalives_sent"):
                known.peer.want_handshake()  # no session to carry it: make one
            return
        state = self._dp.peer_state(pid)
        endpoint = None if state is None else state["endpoint"]
        if endpoint is None:
            # Unreachable until it makes contact (it has no endpoint we know).
            self.counters["handshakes_no_endpoint"] += 1
            return
        self._send(action.data, endpoint, "initiations")

    # -- the timers -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            deadline = self.tick()
            with trio.move_on_after(max(0.0, min(deadline - self._clock(), TICK_MAX))):
                await self._wake.wait()

    def tick(self) -> float:
        """Run every peer's timers on what the datapath saw; when to run them next."""
        now, wall = self._clock(), self._wall()
        nearest = now + TICK_MAX
        for pid, known in list(self._known.items()):
            state = self._dp.peer_state(pid)
            if state is not None:
                known.peer.observe(Activity(
                    sent=_seconds(state["last_tx_ms"]),
                    data_unanswered=_seconds(state["tx_unanswered_ms"]),
                    received_unanswered=_seconds(state["rx_unanswered_ms"])))
            for _ in range(4):  # an action may call for another at once (keepalive -> handshake)
                actions = known.peer.tick(now, wall)
                if not actions:
                    break
                for action in actions:
                    self._act(pid, known, action, now)
            due = known.peer.deadline()
            if due is not None:
                nearest = min(nearest, due)
        return nearest

    # -- status -------------------------------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        """A ``wg show``-like line per peer; no key material but public keys."""
        out = []
        now_ms, wall = int(self._clock() * 1000), self._wall()
        for pid, known in sorted(self._known.items(), key=lambda kv: kv[1].name):
            state = self._dp.peer_state(pid) or {}
            learned = state.get("endpoint_learned_ms", 0)
            endpoint = state.get("endpoint")
            drops = dict(state.get("drops", {}))
            out.append({
                "name": known.name,
                "publicKey": keys.encode(known.peer.remote_static),
                "endpoint": None if endpoint is None else _hostport(*endpoint),
                "endpointLearned": (None if not learned
                                    else round(wall - (now_ms - learned) / 1000, 3)),
                "latestHandshake": known.latest_handshake,
                "handshaking": known.peer.handshaking,
                "rxBytes": state.get("rx_bytes", 0),
                "txBytes": state.get("tx_bytes", 0),
                "staged": state.get("staged", 0),
                "drops": drops,
            })
        return out
