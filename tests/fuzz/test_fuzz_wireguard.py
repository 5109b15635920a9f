"""Bounded fuzzing of the WireGuard receive path: whatever arrives, Device.receive accepts it
or raises Rejected, and a refused datagram changes no session. CONN25_FUZZ_EXAMPLES raises
the count as for the other targets."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conn25.core.wireguard import keys
from conn25.core.wireguard.device import Device
from conn25.core.wireguard.errors import Rejected

FUZZ = settings(max_examples=int(os.environ.get("CONN25_FUZZ_EXAMPLES", "1000")),
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

A, B = Device(keys.generate_private()), Device(keys.generate_private())
PA, PB = A.add_peer(B.identity.public), B.add_peer(A.identity.public)
SRC = bytes(6)


def _setup() -> list[bytes]:
    """Genuine messages of every type, to mutate."""
    init = PA.begin_handshake(0, 1_800_000_000.0)
    cookie = B.receive(init, SRC, 0, under_load=True).reply
    A.receive(cookie, SRC, 0)
    init2 = PA.begin_handshake(1, 1_800_000_001.0)
    response = B.receive(init2, SRC, 1).reply
    A.receive(response, SRC, 1)
    data = PA.encrypt(b"payload", 1)
    B.receive(data, SRC, 1)
    return [init, cookie, init2, response, data]


GENUINE = _setup()


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    base = bytearray(draw(st.sampled_from(GENUINE)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(base) - 1))
        base[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()) and base[0] in (1, 2):
        # Re-mac, so the fuzzing reaches past mac1 into the handshake itself.
        base = bytearray(PA.cookies.add_macs(bytes(base), 2))
    return bytes(base[: draw(st.integers(0, len(base)))] if draw(st.booleans()) else base)


@FUZZ
@given(datagrams(), st.booleans())
def test_receive_accepts_or_rejects_and_a_rejection_changes_no_session(data, under_load):
    before = (PB.current, PB.previous, PB.next)
    counters = [s.send_counter for s in before if s is not None]
    try:
        B.receive(data, SRC, 2, under_load=under_load)
    except Rejected:
        assert (PB.current, PB.previous, PB.next) == before
        assert [s.send_counter for s in before if s is not None] == counters
