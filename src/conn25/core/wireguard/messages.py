"""The four WireGuard messages, encoded and decoded with `struct`.

Every decoder fails closed with MessageError on anything malformed: a wrong length, a wrong
type, non-zero reserved bytes. Integers on the wire are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Self

from .errors import Rejected

INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4

INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
TRANSPORT_HEADER_LEN = 16
TAG_LEN = 16  # a ChaCha20-Poly1305 tag, also the length of mac1 and mac2
MIN_TRANSPORT_LEN = TRANSPORT_HEADER_LEN + TAG_LEN  # a keepalive: nothing but the tag

# type (1 byte) + 3 reserved zero bytes read as one little-endian u32.
_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
_TRANSPORT = struct.Struct("<IIQ")


class MessageError(Rejected):
    """A datagram that is not a well-formed WireGuard message."""


class _Fixed:
    """A fixed-size message: its fields, in order, are the struct's after the type word."""

    KIND: ClassVar[int]
    LAYOUT: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.KIND, *(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def decode(cls, data: bytes) -> Self:
        _check(data, cls.KIND, cls.LAYOUT.size)
        _, *values = cls.LAYOUT.unpack(data)
        return cls(*values)


@dataclass(frozen=True, slots=True)
class Initiation(_Fixed):
    KIND: ClassVar[int] = INITIATION
    LAYOUT: ClassVar[struct.Struct] = _INITIATION
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)


@dataclass(frozen=True, slots=True)
class Response(_Fixed):
    KIND: ClassVar[int] = RESPONSE
    LAYOUT: ClassVar[struct.Struct] = _RESPONSE
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)


@dataclass(frozen=True, slots=True)
class CookieReply(_Fixed):
    KIND: ClassVar[int] = COOKIE_REPLY
    LAYOUT: ClassVar[struct.Struct] = _COOKIE_REPLY
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


@dataclass(frozen=True, slots=True)
class Transport:
    receiver: int
    counter: int
    encrypted: bytes

    def encode(self) -> bytes:
        return _TRANSPORT.pack(TRANSPORT, self.receiver, self.counter) + self.encrypted

    @classmethod
    def decode(cls, data: bytes) -> Transport:
        if len(data) < MIN_TRANSPORT_LEN:
            raise MessageError(f"a transport message is at least {MIN_TRANSPORT_LEN} bytes, "
                               f"got {len(data)}")
        _check(data, TRANSPORT, None)
        _, receiver, counter = _TRANSPORT.unpack_from(data)
        return cls(receiver, counter, bytes(data[TRANSPORT_HEADER_LEN:]))


def message_type(data: bytes) -> int:
    """The type of a datagram whose first four bytes are well formed; MessageError if not."""
    if len(data) < 4:
        raise MessageError(f"a message is at least 4 bytes, got {len(data)}")
    kind = data[0]
    if kind not in (INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT):
        raise MessageError(f"unknown message type {kind}")
    if any(data[1:4]):
        raise MessageError("reserved bytes are not zero")
    return kind


def _check(data: bytes, kind: int, length: int | None) -> None:
    if length is not None and len(data) != length:
        raise MessageError(f"message type {kind} is {length} bytes, got {len(data)}")
    got = message_type(data)
    if got != kind:
        raise MessageError(f"expected message type {kind}, got {got}")
