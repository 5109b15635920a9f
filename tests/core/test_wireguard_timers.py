"""The per-peer timers and session bookkeeping, driven by `now` alone."""

from __future__ import annotations

import itertools

import pytest
from wgpair import JITTER, SRC_A, SRC_B, WALL0, pair

from conn25.core.wireguard.errors import Rejected
from conn25.core.wireguard.peer import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    Activity,
    GaveUp,
    Keepalive,
    Send,
)


def sends(actions: list, what: str) -> list[Send | Keepalive]:
    return [a for a in actions if isinstance(a, Send | Keepalive) and a.what == what]


def test_an_unanswered_initiation_is_retransmitted_then_given_up():
    p = pair()
    p.pa.begin_handshake(0, WALL0)
    assert p.pa.deadline() == REKEY_TIMEOUT + JITTER
    assert p.pa.tick(REKEY_TIMEOUT, WALL0 + REKEY_TIMEOUT) == []
    times = []
    now = 0.0
    for _ in range(100):
        now = p.pa.deadline()
        assert now is not None
        actions = p.pa.tick(now, WALL0 + now)
        if any(isinstance(a, GaveUp) for a in actions):
            break
        [resend] = sends(actions, "initiation")
        times.append(now)
        # Each retransmit is a fresh initiation that the responder accepts.
        assert p.b.receive(resend.data, SRC_A, now).keypair is not None
    assert times[0] == REKEY_TIMEOUT + JITTER
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(g - (REKEY_TIMEOUT + JITTER)) < 1e-9 for g in gaps)
    assert times[-1] < REKEY_ATTEMPT_TIME <= now
    assert not p.pa.handshaking and p.pa.deadline() is None
    assert p.pa.tick(now + 60, WALL0 + now + 60) == []


def test_an_answered_handshake_stops_retransmitting_and_confirms_with_a_keepalive():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    p.a.receive(p.b.receive(init, SRC_A, 0).reply, SRC_B, 1)
    [keepalive] = p.pa.tick(1, WALL0 + 1)
    assert isinstance(keepalive, Keepalive)
    assert p.b.receive(p.pa.keepalive(1), SRC_A, 1).payload == b""
    assert p.pb.current is not None and p.pb.next is None
    assert p.pa.tick(REKEY_TIMEOUT + 1, WALL0 + 6) == []


def test_data_sent_first_makes_the_confirming_keepalive_unneeded():
    p = pair()
    p.a.receive(p.b.receive(p.pa.begin_handshake(0, WALL0), SRC_A, 0).reply, SRC_B, 0)
    assert p.pa.encrypt(b"data", 0) is not None
    assert p.pa.tick(0, WALL0) == []


def test_a_keepalive_follows_received_data_when_nothing_is_sent():
    p = pair()
    p.handshake(0)
    p.b.receive(p.pa.encrypt(b"ping", 1), SRC_A, 1)
    assert p.pb.tick(1 + KEEPALIVE_TIMEOUT - 0.1, WALL0) == []
    [keepalive] = p.pb.tick(1 + KEEPALIVE_TIMEOUT, WALL0)
    assert isinstance(keepalive, Keepalive)
    assert p.a.receive(p.pb.keepalive(1 + KEEPALIVE_TIMEOUT), SRC_B, 11).payload == b""
    # A keepalive received does not call for one back.
    assert sends(p.pa.tick(30, WALL0 + 30), "keepalive") == []


def test_a_reply_sent_in_time_cancels_the_keepalive():
    p = pair()
    p.handshake(0)
    p.b.receive(p.pa.encrypt(b"ping", 1), SRC_A, 1)
    p.pb.encrypt(b"pong", 2)
    assert p.pb.tick(1 + KEEPALIVE_TIMEOUT, WALL0) == []


def test_the_initiator_rekeys_after_rekey_after_time_and_loses_nothing():
    p = pair()
    p.handshake(0)
    old = p.pa.current.keypair
    assert p.pa.encrypt(b"x", REKEY_AFTER_TIME - 1) is not None
    assert p.pa.tick(REKEY_AFTER_TIME - 1, WALL0) == [] and not p.pa.handshaking
    t = REKEY_AFTER_TIME
    in_flight = p.pa.encrypt(b"in flight", t)  # still sent under the old session
    assert in_flight is not None
    [init] = sends(p.pa.tick(t, WALL0 + t), "initiation")
    r = p.b.receive(init.data, SRC_A, t)
    p.a.receive(r.reply, SRC_B, t)
    assert p.pa.current.keypair != old and p.pa.previous.keypair == old
    # B has not switched yet: its current is the old session, the new one waits as next.
    assert p.b.receive(in_flight, SRC_A, t).payload == b"in flight"
    new = p.pa.encrypt(b"new", t)
    assert p.b.receive(new, SRC_A, t).payload == b"new"
    assert p.pb.current.keypair.receive_key == p.pa.current.keypair.send_key
    assert p.pb.previous is not None and p.pb.previous.keypair.local_index == old.remote_index
    # Data from B under the old session still reaches A.
    late = p.pb.previous.encrypt(b"late")
    assert p.a.receive(late, SRC_B, t).payload == b"late"


def test_crossing_handshakes_leave_both_sides_able_to_read_each_other():
    """Both initiate at once and each answers the other: each then sends under the session
    of its own handshake, which the other holds only as its unconfirmed next. That one is
    kept (as previous) when the other's own handshake completes, as wireguard-go and the
    kernel's module keep it; dropping it lost everything until a new handshake."""
    p = pair()
    p.handshake(0)
    t = 30.0
    init_a = p.pa.begin_handshake(t, WALL0 + t)
    init_b = p.pb.begin_handshake(t, WALL0 + t)
    to_a = p.b.receive(init_a, SRC_A, t).reply
    to_b = p.a.receive(init_b, SRC_B, t).reply
    assert to_a is not None and to_b is not None
    p.a.receive(to_a, SRC_B, t)
    p.b.receive(to_b, SRC_A, t)
    assert p.pa.current.keypair.send_key == p.pb.previous.keypair.receive_key
    assert p.pb.current.keypair.send_key == p.pa.previous.keypair.receive_key
    for sender, receiver, source in ((p.pa, p.b, SRC_A), (p.pb, p.a, SRC_B)):
        data = sender.encrypt(b"after", t + 0.1)
        assert data is not None
        assert receiver.receive(data, source, t + 0.1).payload == b"after"


def test_the_responder_does_not_rekey_on_send():
    p = pair()
    p.handshake(0)
    t = REKEY_AFTER_TIME + 1
    assert p.pb.encrypt(b"x", t) is not None
    assert sends(p.pb.tick(t, WALL0 + t), "initiation") == []


def test_a_session_is_rejected_after_reject_after_time():
    p = pair()
    p.handshake(0)
    t = REJECT_AFTER_TIME - 0.5
    data = p.pa.encrypt(b"x", t)
    assert data is not None
    p.pa.tick(t, WALL0 + t)  # a rekey starts; nobody answers it
    assert p.pa.encrypt(b"x", REJECT_AFTER_TIME) is None
    with pytest.raises(Rejected, match="expired"):
        p.b.receive(data, SRC_A, REJECT_AFTER_TIME)
    p.pb.tick(REJECT_AFTER_TIME, WALL0)
    assert p.pb.current is None


def test_sending_without_a_session_asks_for_a_handshake():
    p = pair()
    assert p.pa.encrypt(b"x", 0) is None
    [init] = sends(p.pa.tick(0, WALL0), "initiation")
    assert p.b.receive(init.data, SRC_A, 0).keypair is not None
    # One handshake at a time: more packets do not start another.
    assert p.pa.encrypt(b"y", 0.1) is None
    assert sends(p.pa.tick(0.1, WALL0), "initiation") == []


def test_data_that_gets_no_answer_starts_a_new_handshake():
    p = pair()
    p.handshake(0)
    p.pa.encrypt(b"x", 1)
    due = 1 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + JITTER
    assert sends(p.pa.tick(due - 0.01, WALL0 + due), "initiation") == []
    assert len(sends(p.pa.tick(due, WALL0 + due), "initiation")) == 1


def test_the_initiator_rekeys_when_receiving_on_an_old_session():
    p = pair()
    p.handshake(0)
    t = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
    p.a.receive(p.pb.encrypt(b"x", t - 1), SRC_B, t - 1)
    assert sends(p.pa.tick(t - 1, WALL0 + t), "initiation") == []
    p.a.receive(p.pb.encrypt(b"x", t), SRC_B, t)
    assert len(sends(p.pa.tick(t, WALL0 + t), "initiation")) == 1


def test_the_index_table_holds_only_live_indices():
    p = pair()
    for i in range(20):
        p.handshake(i * 200.0)  # each handshake outlives the last session
        p.pa.tick(i * 200.0 + 1, WALL0)
    assert len(p.a.indices) <= 3


# -- a datapath that holds the sessions: the timers run on what it observed ---------------

def test_observed_data_received_and_unanswered_calls_for_a_keepalive():
    p = pair()
    p.handshake(0)
    p.pb.observe(Activity(sent=None, data_unanswered=None, received_unanswered=3.0))
    assert p.pb.deadline() == 3.0 + KEEPALIVE_TIMEOUT
    assert sends(p.pb.tick(3.0 + KEEPALIVE_TIMEOUT - 0.01, WALL0), "keepalive") == []
    assert len(sends(p.pb.tick(3.0 + KEEPALIVE_TIMEOUT, WALL0), "keepalive")) == 1
    # Once something was sent (the stamp is gone), nothing more is due.
    p.pb.observe(Activity(sent=13.0))
    assert sends(p.pb.tick(40.0, WALL0), "keepalive") == []


def test_observed_data_sent_without_answer_starts_a_handshake_after_15s_plus_jitter():
    p = pair()
    p.handshake(0)
    p.pa.observe(Activity(sent=2.0, data_unanswered=2.0))
    due = 2.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + JITTER
    assert p.pa.deadline() == pytest.approx(due)
    # Observing the same stamp again does not move the deadline (the jitter is drawn once).
    p.pa.observe(Activity(sent=5.0, data_unanswered=2.0))
    assert sends(p.pa.tick(due - 0.01, WALL0 + due), "initiation") == []
    assert len(sends(p.pa.tick(due, WALL0 + due), "initiation")) == 1


def test_an_answer_observed_in_time_cancels_the_new_handshake():
    p = pair()
    p.handshake(0)
    p.pa.observe(Activity(sent=2.0, data_unanswered=2.0))
    p.pa.observe(Activity(sent=2.0, data_unanswered=None))
    assert sends(p.pa.tick(60.0, WALL0 + 60), "initiation") == []


def test_want_handshake_from_the_datapath_starts_one_at_the_next_tick():
    p = pair()
    p.pa.want_handshake()
    assert len(sends(p.pa.tick(0, WALL0), "initiation")) == 1
    assert p.pa.handshaking


def test_confirmed_moves_the_responders_next_session_to_current():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    p.b.receive(init, SRC_A, 0)
    assert p.pb.current is None and p.pb.next is not None
    index = p.pb.next.keypair.local_index
    p.pb.confirmed(index + 1)  # another index: nothing moves
    assert p.pb.current is None
    p.pb.confirmed(index)
    assert p.pb.current is not None and p.pb.current.keypair.local_index == index
    assert p.pb.next is None


def test_a_persistent_keepalive_goes_at_once_then_after_each_quiet_interval():
    p = pair()
    p.handshake(0)
    p.pa.persistent_keepalive = 25.0
    p.pa.observe(Activity(sent=None))
    assert p.pa.deadline() is not None and p.pa.deadline() <= 0
    assert len(sends(p.pa.tick(0.5, WALL0), "keepalive")) == 1
    p.pa.observe(Activity(sent=10.0))
    assert sends(p.pa.tick(34.9, WALL0), "keepalive") == []
    assert len(sends(p.pa.tick(35.0, WALL0), "keepalive")) == 1


def test_without_a_session_a_persistent_keepalive_becomes_a_handshake():
    p = pair()
    p.pa.persistent_keepalive = 25.0
    [ka] = p.pa.tick(0, WALL0)
    assert isinstance(ka, Keepalive)
    assert p.pa.keepalive(0) is None  # no session to carry it: a handshake is wanted
    assert len(sends(p.pa.tick(0.01, WALL0), "initiation")) == 1
