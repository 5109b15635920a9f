"""The handshake, both roles in memory: what completes, and everything that must not."""

from __future__ import annotations

import pytest
from wgpair import SRC_A, SRC_B, WALL0, pair

from conn25.core.wireguard import keys
from conn25.core.wireguard.device import Device
from conn25.core.wireguard.errors import Rejected
from conn25.core.wireguard.messages import CookieReply, Initiation, Response


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def test_both_roles_derive_matching_keypairs_and_talk():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    r = p.b.receive(init, SRC_A, 0)
    kb = r.keypair
    assert r.peer is p.pb and kb is not None and not kb.is_initiator
    assert p.pb.next is not None and p.pb.current is None  # unconfirmed
    ka = p.a.receive(r.reply, SRC_B, 0).keypair
    assert ka is not None and ka.is_initiator
    assert (ka.send_key, ka.receive_key) == (kb.receive_key, kb.send_key)
    assert (ka.local_index, ka.remote_index) == (kb.remote_index, kb.local_index)
    assert ka.send_key != ka.receive_key
    assert p.pa.current is not None and p.pa.current.keypair == ka

    data = p.pa.encrypt(b"hello", 1)
    assert data is not None
    assert p.b.receive(data, SRC_A, 1).payload == b"hello"
    assert p.pb.current is not None and p.pb.current.keypair == kb and p.pb.next is None
    back = p.pb.encrypt(b"world", 1)
    assert back is not None and p.a.receive(back, SRC_B, 1).payload == b"world"


def test_keys_never_show_in_reprs():
    p = pair()
    p.handshake(0)
    ka = p.pa.current.keypair
    text = repr(p.a) + repr(p.pa) + repr(p.pa.current) + repr(ka) + repr(p.a.identity)
    for secret in (ka.send_key, ka.receive_key, p.a.identity.private):
        assert secret.hex() not in text and keys.encode(secret) not in text
        assert repr(secret) not in text


def test_bad_mac1_is_refused():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    with pytest.raises(Rejected, match="mac1"):
        p.b.receive(flip(init, 116), SRC_A, 0)
    with pytest.raises(Rejected, match="mac1"):
        p.b.receive(flip(init, 20), SRC_A, 0)  # the body, under an unchanged mac1


@pytest.mark.parametrize(("where", "start"), [("ephemeral", 8), ("static", 40),
                                              ("static tag", 80), ("timestamp", 88),
                                              ("timestamp tag", 110)])
def test_a_flipped_bit_in_the_initiation_fails_authentication(where, start):
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    # Re-mac so the check under test is the AEAD, not mac1.
    forged = p.pa.cookies.add_macs(flip(init, start), 0)
    with pytest.raises(Rejected):
        p.b.receive(forged, SRC_A, 0)
    assert p.pb.next is None
    # The genuine one still works: nothing was recorded from the forgery.
    assert p.b.receive(init, SRC_A, 0).keypair is not None


def test_a_replayed_or_older_initiation_is_refused():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    assert p.b.receive(init, SRC_A, 0).keypair is not None
    with pytest.raises(Rejected, match="replay"):
        p.b.receive(init, SRC_A, 1)
    older = p.pa.begin_handshake(2, WALL0 - 60)
    with pytest.raises(Rejected, match="replay"):
        p.b.receive(older, SRC_A, 2)
    newer = p.pa.begin_handshake(3, WALL0 + 3)
    assert p.b.receive(newer, SRC_A, 3).keypair is not None


def test_initiations_from_one_peer_are_rate_limited():
    p = pair()
    assert p.b.receive(p.pa.begin_handshake(0, WALL0), SRC_A, 0).keypair is not None
    fast = p.pa.begin_handshake(0.01, WALL0 + 1)
    with pytest.raises(Rejected, match="too fast"):
        p.b.receive(fast, SRC_A, 0.01)
    assert p.b.receive(fast, SRC_A, 0.05).keypair is not None


def test_an_initiation_from_an_unknown_key_is_refused():
    p = pair()
    stranger = Device(keys.generate_private())
    init = stranger.add_peer(p.b.identity.public).begin_handshake(0, WALL0)
    with pytest.raises(Rejected, match="unknown key"):
        p.b.receive(init, SRC_A, 0)


def test_bad_responses_are_refused():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    response = p.b.receive(init, SRC_A, 0).reply
    msg = Response.decode(response)
    remac = p.pb.cookies.add_macs
    with pytest.raises(Rejected, match="mac1"):
        p.a.receive(flip(response, 70), SRC_B, 0)
    with pytest.raises(Rejected):  # flipped bit in the empty AEAD
        p.a.receive(remac(flip(response, 50), 0), SRC_B, 0)
    with pytest.raises(Rejected, match="index"):
        wrong = Response(msg.sender, msg.receiver + 1, msg.ephemeral, msg.encrypted_nothing)
        p.a.receive(remac(wrong.encode(), 0), SRC_B, 0)
    assert p.pa.handshaking
    assert p.a.receive(response, SRC_B, 0).keypair is not None
    with pytest.raises(Rejected):  # replayed: that handshake is over
        p.a.receive(response, SRC_B, 0)


def test_garbage_is_refused():
    p = pair()
    for data in (b"", b"\x01", b"\x05\0\0\0" + bytes(100), b"\x01\0\0\0" + bytes(10)):
        with pytest.raises(Rejected):
            p.b.receive(data, SRC_A, 0)


# -- under load: cookies ----------------------------------------------------------------

def test_under_load_an_initiation_without_mac2_gets_a_cookie_reply_then_succeeds():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    r = p.b.receive(init, SRC_A, 0, under_load=True)
    assert r.keypair is None and r.reply is not None and p.pb.next is None
    reply = CookieReply.decode(r.reply)
    assert reply.receiver == Initiation.decode(init).sender
    p.a.receive(r.reply, SRC_B, 0)

    retry = p.pa.begin_handshake(1, WALL0 + 1)
    assert retry[-16:] != bytes(16)  # carries mac2 now
    r = p.b.receive(retry, SRC_A, 1, under_load=True)
    assert r.keypair is not None and r.reply is not None
    assert p.a.receive(r.reply, SRC_B, 1).keypair is not None


def test_under_load_a_bad_mac2_is_not_processed():
    p = pair()
    p.a.receive(p.b.receive(p.pa.begin_handshake(0, WALL0), SRC_A, 0, under_load=True).reply,
                SRC_B, 0)
    retry = p.pa.begin_handshake(1, WALL0 + 1)
    bad = retry[:-1] + bytes([retry[-1] ^ 1])
    assert p.b.receive(bad, SRC_A, 1, under_load=True).keypair is None
    # A cookie is bound to the address it was given to.
    elsewhere = SRC_A[:-1] + b"\x00"
    assert p.b.receive(retry, elsewhere, 1, under_load=True).keypair is None
    assert p.pb.next is None
    # Not under load, mac2 is not needed.
    assert p.b.receive(bad, SRC_A, 1).keypair is not None


def test_cookie_replies_that_answer_nothing_are_refused():
    p = pair()
    init = p.pa.begin_handshake(0, WALL0)
    cookie = p.b.receive(init, SRC_A, 0, under_load=True).reply
    with pytest.raises(Rejected):
        p.a.receive(flip(cookie, 40), SRC_B, 0)
    p.a.receive(cookie, SRC_B, 0)
    with pytest.raises(Rejected):  # replayed: it was used
        p.a.receive(cookie, SRC_B, 0)
    p.pa.begin_handshake(1, WALL0 + 1)
    with pytest.raises(Rejected):  # answers an initiation that is no longer in flight
        p.a.receive(cookie, SRC_B, 1)


def test_a_cookie_stops_being_used_after_two_minutes():
    p = pair()
    p.a.receive(p.b.receive(p.pa.begin_handshake(0, WALL0), SRC_A, 0, under_load=True).reply,
                SRC_B, 0)
    assert p.pa.begin_handshake(119, WALL0 + 119)[-16:] != bytes(16)
    assert p.pa.begin_handshake(121, WALL0 + 121)[-16:] == bytes(16)


def test_under_load_handshakes_are_rate_limited_per_address():
    p = pair()
    p.a.receive(p.b.receive(p.pa.begin_handshake(0, WALL0), SRC_A, 0, under_load=True).reply,
                SRC_B, 0)
    accepted = refused = 0
    # Ten valid initiations, each newer and spaced just past the per-peer limit (21 ms):
    # the address's bucket starts at 5 tokens and refills 0.42 per 21 ms.
    for i in range(10):
        now = 1 + i * 0.021
        init = p.pa.begin_handshake(now, WALL0 + now)
        try:
            p.b.receive(init, SRC_A, now, under_load=True)
            accepted += 1
        except Rejected as e:
            assert "too many handshakes" in str(e)
            refused += 1
    assert (accepted, refused) == (8, 2)
    # Not under load, the address is not limited.
    init = p.pa.begin_handshake(2, WALL0 + 2)
    assert p.b.receive(init, SRC_A, 2).keypair is not None
