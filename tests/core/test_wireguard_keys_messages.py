"""WireGuard keys and the four messages' wire format."""

from __future__ import annotations

import base64

import pytest

from conn25.core.wireguard import keys
from conn25.core.wireguard.messages import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    RESPONSE_LEN,
    CookieReply,
    Initiation,
    MessageError,
    Response,
    Transport,
    message_type,
)

# RFC 7748, section 6.1: Alice's private and public keys.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_public_from_private_matches_the_rfc_vector():
    assert keys.public_from_private(ALICE_PRIVATE) == ALICE_PUBLIC


def test_keys_round_trip_through_base64():
    private = keys.generate_private()
    text = keys.encode(private)
    assert len(text) == 44 and text.endswith("=")
    assert keys.decode(text) == private
    with pytest.raises(ValueError):  # as strict as wg: readers of key files strip the newline
        keys.decode(text + "\n")
    assert keys.public_from_private(private) != private
    assert private[0] & 7 == 0 and private[31] & 0xC0 == 0x40  # clamped, as `wg genkey`


@pytest.mark.parametrize("text", [
    "", "abc", base64.b64encode(bytes(31)).decode(), base64.b64encode(bytes(33)).decode(),
    "!" * 43 + "=", base64.urlsafe_b64encode(b"\xff" * 32).decode(),
])
def test_malformed_keys_are_refused_without_echoing_them(text):
    with pytest.raises(ValueError) as e:
        keys.decode(text)
    if len(text) > 8:
        assert text not in str(e.value)


def test_low_order_points_are_refused():
    with pytest.raises(ValueError):
        keys.dh(ALICE_PRIVATE, bytes(32))


MESSAGES = [
    (Initiation(0x01020304, b"e" * 32, b"s" * 48, b"t" * 28, b"1" * 16, b"2" * 16),
     INITIATION_LEN),
    (Response(7, 9, b"e" * 32, b"n" * 16, b"1" * 16, b"2" * 16), RESPONSE_LEN),
    (CookieReply(7, b"n" * 24, b"c" * 32), COOKIE_REPLY_LEN),
    (Transport(7, 2**64 - 1, b"x" * 16), 32),
]


@pytest.mark.parametrize(("msg", "length"), MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg, length):
    data = msg.encode()
    assert len(data) == length
    assert data[0] == message_type(data) and data[1:4] == b"\0\0\0"
    assert type(msg).decode(data) == msg


def test_integers_are_little_endian():
    data = Transport(0x01020304, 5, bytes(16)).encode()
    assert data[4:8] == b"\x04\x03\x02\x01" and data[8:16] == b"\x05" + bytes(7)


@pytest.mark.parametrize(("msg", "length"), MESSAGES, ids=lambda m: type(m).__name__)
def test_malformed_messages_are_refused(msg, length):
    data = msg.encode()
    bad = [data[:-1], data[:3], b""]
    if not isinstance(msg, Transport):
        bad.append(data + b"\0")
    bad.append(bytes([data[0] % 4 + 1]) + data[1:])  # another type
    bad.append(b"\x09" + data[1:])                     # no such type
    bad += [data[:i] + b"\x01" + data[i + 1:] for i in (1, 2, 3)]  # reserved bytes
    for b in bad:
        with pytest.raises(MessageError):
            type(msg).decode(b)


def test_a_transport_message_needs_at_least_a_tag():
    with pytest.raises(MessageError):
        Transport.decode(Transport(1, 0, bytes(15)).encode())
    assert Transport.decode(Transport(1, 0, bytes(16)).encode()).encrypted == bytes(16)
