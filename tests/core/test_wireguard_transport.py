"""The reference transport: counter nonces and the replay window."""

from __future__ import annotations

import pytest
from wgpair import SRC_A, pair

from conn25.core.wireguard.errors import Rejected
from conn25.core.wireguard.messages import Transport
from conn25.core.wireguard.transport import (
    REJECT_AFTER_MESSAGES,
    REPLAY_WINDOW,
    ReplayWindow,
    pad,
    seal,
)


def test_the_window_is_at_least_wireguards():
    assert REPLAY_WINDOW >= 2048 - 32
    assert ReplayWindow().size == REPLAY_WINDOW


def test_in_order_counters_are_accepted_once():
    w = ReplayWindow()
    assert all(w.accept(c) for c in range(100))
    assert not any(w.accept(c) for c in range(100))


def test_out_of_order_within_the_window_is_accepted_once():
    w = ReplayWindow(64)
    for c in (10, 5, 7, 63 + 5, 6):
        assert w.accept(c)
    assert not w.accept(5) and not w.accept(10) and not w.accept(68)
    assert w.accept(9)


def test_too_old_is_refused():
    w = ReplayWindow(64)
    assert w.accept(100)
    assert not w.accept(100 - 64)
    assert w.accept(100 - 63)


def test_a_jump_past_the_window_forgets_it():
    w = ReplayWindow(64)
    for c in range(10):
        w.accept(c)
    assert w.accept(1000)
    assert not w.fresh(1000 - 64)
    assert w.accept(999) and w.accept(1000 - 63)
    assert w.accept(2**63)  # a huge jump is cheap and keeps the rule
    assert not w.accept(2**63) and not w.accept(1000)


def test_the_last_counters_are_refused():
    w = ReplayWindow()
    assert w.accept(REJECT_AFTER_MESSAGES - 1)
    assert not w.accept(REJECT_AFTER_MESSAGES)
    assert not w.accept(2**64 - 1)


def test_fresh_does_not_mark():
    w = ReplayWindow()
    assert w.fresh(3) and w.fresh(3)
    assert w.accept(3) and not w.fresh(3)


def test_padding_is_to_sixteen_bytes():
    assert [len(pad(bytes(n))) for n in (0, 1, 15, 16, 17)] == [0, 16, 16, 16, 32]


def test_the_nonce_is_the_counter():
    p = pair()
    p.handshake(0)
    msgs = [Transport.decode(p.pa.encrypt(b"x", 1)) for _ in range(3)]
    assert [m.counter for m in msgs] == [1, 2, 3]  # the confirming keepalive was 0
    ka = p.pa.current.keypair
    assert Transport.decode(seal(ka, 2, b"x")) == msgs[1]


def test_transport_rejects_replays_flips_and_strangers():
    p = pair()
    p.handshake(0)
    data = p.pa.encrypt(b"payload", 1)
    bad = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(Rejected):
        p.b.receive(bad, SRC_A, 1)
    # The forgery did not mark its counter: the genuine message still goes through, once.
    assert p.b.receive(data, SRC_A, 1).payload == b"payload"
    with pytest.raises(Rejected, match="replay"):
        p.b.receive(data, SRC_A, 1)
    msg = Transport.decode(data)
    with pytest.raises(Rejected, match="index"):
        p.b.receive(Transport(msg.receiver ^ 1, 9, msg.encrypted).encode(), SRC_A, 1)
    later = [p.pa.encrypt(bytes([i]), 1) for i in range(3)]
    for i in (2, 0, 1):  # out of order
        assert p.b.receive(later[i], SRC_A, 1).payload == bytes([i])
