"""A node's side of WireGuard: its identity, its peers, and the dispatch of received
datagrams to them (by static key for initiations, by index for everything else). Sans-IO:
the caller says where a datagram came from and whether the node is under load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import keys
from .cookie import CookieChecker
from .errors import Rejected
from .handshake import ZERO_PSK, Identity, Keypair, consume_initiation
from .messages import (
    COOKIE_REPLY,
    INITIATION,
    RESPONSE,
    CookieReply,
    Initiation,
    Response,
    Transport,
    message_type,
)
from .peer import Peer, Randomness
from .ratelimit import HandshakeRateLimiter


@dataclass(frozen=True)
class Received:
    """What a datagram did: the peer it belongs to, bytes to send back to its source, a
    keypair a handshake produced, the plaintext of a transport message."""
    peer: Peer | None = None
    reply: bytes | None = field(default=None, repr=False)
    keypair: Keypair | None = None
    payload: bytes | None = field(default=None, repr=False)


class Device:
    def __init__(self, private: bytes, rand: Randomness | None = None) -> None:
        self.identity = Identity.from_private(private)
        self._rand = rand or Randomness()
        self.cookies = CookieChecker(self.identity.public, self._rand.token)
        self.ratelimit = HandshakeRateLimiter()
        self.peers: dict[bytes, Peer] = {}
        self._by_index: dict[int, Peer] = {}
        self._given: dict[Peer, set[int]] = {}  # the indices each peer was given

    def __repr__(self) -> str:
        return f"Device({keys.encode(self.identity.public)}, {len(self.peers)} peers)"

    def add_peer(self, public: bytes, psk: bytes = ZERO_PSK,
                 persistent_keepalive: float = 0.0) -> Peer:
        peer = Peer(self.identity, public, psk=psk, rand=self._rand,
                    new_index=lambda: self._allocate(peer),
                    persistent_keepalive=persistent_keepalive)
        self.peers[public] = peer
        return peer

    def remove_peer(self, public: bytes) -> None:
        """Forget a peer (no longer in the configuration) and the indices it was given."""
        peer = self.peers.pop(public, None)
        if peer is None:
            return
        for index in self._given.pop(peer, set()):
            if self._by_index.get(index) is peer:
                del self._by_index[index]

    def _allocate(self, peer: Peer) -> int:
        # Indices are random (they say nothing about the node) and unique among live ones.
        # The peer's indices it no longer uses are forgotten first, so the table stays as
        # large as the live sessions and handshakes. Only this peer's own indices are
        # looked at: a handshake costs the same with ten peers or ten thousand.
        given = self._given.setdefault(peer, set())
        for stale in given - peer.local_indices():
            given.discard(stale)
            if self._by_index.get(stale) is peer:  # not since given to another peer
                del self._by_index[stale]
        for _ in range(64):
            index = self._rand.index() & 0xFFFFFFFF
            owner = self._by_index.get(index)
            if owner is None or index not in owner.local_indices():
                self._by_index[index] = peer
                given.add(index)
                return index
        raise RuntimeError("no free session index")

    @property
    def indices(self) -> frozenset[int]:
        """The session indices the table holds (live ones, and stale ones not yet pruned)."""
        return frozenset(self._by_index)

    def peer_by_index(self, index: int) -> Peer:
        peer = self._by_index.get(index)
        if peer is None or index not in peer.local_indices():
            self._by_index.pop(index, None)
            raise Rejected("unknown receiver index")
        return peer

    def receive(self, data: bytes, source: bytes, now: float,
                under_load: bool = False) -> Received:
        """Handle one datagram from `source` (the packed IP address, then the port as two
        bytes: a cookie is bound to both, the rate limit to the address); Rejected, saying
        why, for anything that is not accepted."""
        kind = message_type(data)
        if kind in (INITIATION, RESPONSE):
            return self._handshake(kind, data, source, now, under_load)
        if kind == COOKIE_REPLY:
            reply = CookieReply.decode(data)
            peer = self.peer_by_index(reply.receiver)
            if reply.receiver != peer.pending_index:
                raise Rejected("cookie reply for no handshake in flight")
            peer.consume_cookie_reply(reply, now)
            return Received(peer)
        msg = Transport.decode(data)
        peer = self.peer_by_index(msg.receiver)
        return Received(peer, payload=peer.decrypt(msg, now))

    def _handshake(self, kind: int, data: bytes, source: bytes, now: float,
                   under_load: bool) -> Received:
        msg = Initiation.decode(data) if kind == INITIATION else Response.decode(data)
        if not self.cookies.mac1_ok(data):
            raise Rejected("bad mac1")
        if under_load and not self.cookies.mac2_ok(data, source, now):
            # Prove the source can receive before spending a Diffie-Hellman on it.
            return Received(reply=self.cookies.reply(data, msg.sender, source, now))
        if under_load and not self.ratelimit.allow(source[:-2], now):
            raise Rejected("too many handshakes from this address")
        if isinstance(msg, Initiation):
            init = consume_initiation(self.identity, msg)
            peer = self.peers.get(init.remote_static)
            if peer is None:
                raise Rejected("initiation from an unknown key")
            response, keypair = peer.consume_initiation(init, now)
            return Received(peer, reply=response, keypair=keypair)
        peer = self.peer_by_index(msg.receiver)
        return Received(peer, keypair=peer.consume_response(msg, now))
