"""The four WireGuard messages' wire format (keys: test_wireguard_keys_format)."""

from __future__ import annotations

import pytest

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
