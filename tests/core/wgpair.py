"""Two WireGuard devices that know each other, with fixed jitter, for the core tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from conn25.core.wireguard import keys
from conn25.core.wireguard.device import Device
from conn25.core.wireguard.peer import Keepalive, Peer, Randomness

JITTER = 0.2
WALL0 = 1_800_000_000.0  # wall clock at now == 0
SRC_A = bytes([192, 0, 2, 1, 0xA2, 0x29])  # A's address and port, as a cookie binds them
SRC_B = bytes([192, 0, 2, 2, 0xA2, 0x29])


def randomness() -> Randomness:
    indices = itertools.count(1000)
    return Randomness(index=lambda: next(indices), jitter=lambda: JITTER)


@dataclass
class Pair:
    a: Device
    b: Device
    pa: Peer  # A's view of B
    pb: Peer  # B's view of A

    def handshake(self, now: float) -> None:
        """A initiates, B answers, A confirms with a keepalive."""
        init = self.pa.begin_handshake(now, WALL0 + now)
        r = self.b.receive(init, SRC_A, now)
        assert r.reply is not None
        assert self.a.receive(r.reply, SRC_B, now).keypair is not None
        [keepalive] = self.pa.tick(now, WALL0 + now)
        assert isinstance(keepalive, Keepalive)
        data = self.pa.keepalive(now)
        assert data is not None and self.b.receive(data, SRC_A, now).payload == b""


def pair() -> Pair:
    a, b = Device(keys.generate_private(), randomness()), Device(keys.generate_private(),
                                                                 randomness())
    return Pair(a, b, a.add_peer(b.identity.public), b.add_peer(a.identity.public))
