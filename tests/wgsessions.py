"""WireGuard sessions for the fastpath tests, built with the pure-Python reference.

A test gives a datapath one side of a matching keypair pair (fixed keys and
indices, so a failure is reproducible) and plays the other side itself with
conn25.core.wireguard.transport: it seals what the peer would send and opens
what the datapath sent. The reference was written apart from the C code, so a
datagram that both agree on is WireGuard's format, not just the datapath's
idea of it.
"""

from __future__ import annotations

import itertools

from conn25.core.wireguard import transport
from conn25.core.wireguard.handshake import Keypair
from conn25.core.wireguard.messages import Transport

# Fixed, distinct keys: the two directions of a session never share one.
KEY_OUT = bytes(range(1, 33))          # the datapath's send key (the peer's receive key)
KEY_IN = bytes(range(101, 133))        # the datapath's receive key (the peer's send key)
LOCAL_INDEX, REMOTE_INDEX = 0x0A0B0C0D, 0x01020304


def pair(local_index: int = LOCAL_INDEX, remote_index: int = REMOTE_INDEX,
         key_out: bytes = KEY_OUT, key_in: bytes = KEY_IN,
         initiator: bool = True) -> tuple[Keypair, Keypair]:
    """(ours, theirs): the two ends of one session, as two handshakes would leave them."""
    ours = Keypair(key_out, key_in, local_index, remote_index, 0.0, initiator)
    theirs = Keypair(key_in, key_out, remote_index, local_index, 0.0, not initiator)
    return ours, theirs


def install(dp, peer: int, keypair: Keypair, now_ms: int, *, as_next: bool = False) -> None:
    dp.install_keypair(peer, local_index=keypair.local_index,
                       remote_index=keypair.remote_index, send_key=keypair.send_key,
                       receive_key=keypair.receive_key, initiator=keypair.is_initiator,
                       created_ms=now_ms, as_next=as_next)


def ip_length(plaintext: bytes) -> int:
    """The length the IP header inside a transport payload gives (the rest is padding)."""
    if not plaintext:
        return 0
    if plaintext[0] >> 4 == 4:
        return int.from_bytes(plaintext[2:4], "big")
    return 40 + int.from_bytes(plaintext[4:6], "big")


class Remote:
    """The far end of a session with a datapath: a peer the test plays."""

    def __init__(self, keypair: Keypair) -> None:
        self.keypair = keypair
        self._counters = itertools.count()

    def seal(self, packet: bytes, counter: int | None = None) -> bytes:
        """`packet` as the peer would send it (b"": a keepalive); the next counter unless given."""
        if counter is None:
            counter = next(self._counters)
        return transport.seal(self.keypair, counter, transport.pad(bytes(packet)))

    def open(self, datagram: bytes) -> bytes:
        """The IP packet in a datagram the datapath sealed (padding trimmed);
        Rejected if it does not authenticate under this session."""
        plain = transport.unseal(self.keypair, Transport.decode(datagram))
        n = ip_length(plain)
        assert n <= len(plain) and not any(plain[n:]), "padding must be zeros"
        return plain[:n]

    @staticmethod
    def counter(datagram: bytes) -> int:
        return Transport.decode(datagram).counter


def connect(dp, peer: int, now_ms: int, *, initiator: bool = True,
            as_next: bool = False, **keys) -> Remote:
    """Give `dp` a session with `peer` (created at now_ms); the peer's end, for the test."""
    ours, theirs = pair(initiator=initiator, **keys)
    install(dp, peer, ours, now_ms, as_next=as_next)
    return Remote(theirs)


def node_keypair(keypair: Keypair) -> dict:
    """A keypair as JSON, for the namespace nodes (fastpath/fastpath_node.py)."""
    return {"local_index": keypair.local_index, "remote_index": keypair.remote_index,
            "send_key": keypair.send_key.hex(), "receive_key": keypair.receive_key.hex(),
            "initiator": keypair.is_initiator}
