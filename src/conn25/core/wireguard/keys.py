"""WireGuard keys: X25519 key pairs in WireGuard's base64 text form.

The same formats as ``wg genkey`` / ``wg pubkey``, so keys made by either tool
work in both. Nothing here puts a key's value into an exception message:
a malformed private key must not end up in a log or on a terminal.
"""

from __future__ import annotations

import base64
import binascii
import secrets

# PyNaCl (libsodium), the library the handshake's other primitives come from: loading
# `cryptography` too would cost a node about 9 MiB of memory for X25519 alone.
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import RuntimeError as NaclRuntimeError

KEY_LEN = 32
KEY_LEN_BASE64 = 44  # 32 bytes in padded base64: 43 characters and one "="


def _clamp(key: bytes) -> bytes:
    """The scalar as X25519 uses it (clear the low 3 bits and the top bit, set bit 254),
    applied to a new private key as ``wg genkey`` does, so the file holds that scalar."""
    k = bytearray(key)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private() -> bytes:
    """A new random private key (32 bytes, clamped)."""
    return _clamp(secrets.token_bytes(KEY_LEN))


def public_from_private(private: bytes) -> bytes:
    """The public key (32 bytes) of a 32-byte private key. X25519 clamps the scalar
    itself, so an unclamped key gives the same public key as in ``wg pubkey``."""
    if len(private) != KEY_LEN:
        raise ValueError(f"a private key is {KEY_LEN} bytes, got {len(private)}")
    return crypto_scalarmult_base(private)


def encode(key: bytes) -> str:
    """A 32-byte key as WireGuard's base64 text (44 characters)."""
    if len(key) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, got {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode(text: str) -> bytes:
    """WireGuard's base64 text of a key as its 32 bytes.

    As strict as ``wg``: standard base64 alphabet, exactly 44 characters ending in
    one "=", and the unused low bits of the last character zero (one key, one
    spelling, so comparing texts compares keys). ValueError says what is wrong
    without quoting the text, which may be a private key.
    """
    if len(text) != KEY_LEN_BASE64:
        raise ValueError(f"not a WireGuard key: {len(text)} characters, a key is "
                         f"{KEY_LEN_BASE64} characters of base64")
    if not text.endswith("=") or text.endswith("=="):
        raise ValueError("not a WireGuard key: a key's base64 ends in exactly one \"=\"")
    try:
        key = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("not a WireGuard key: not base64 (A-Z, a-z, 0-9, \"+\" and "
                         "\"/\")") from None
    if base64.b64encode(key).decode("ascii") != text:
        raise ValueError("not a WireGuard key: the character before \"=\" carries bits "
                         "beyond 32 bytes (not the canonical base64 of a key)")
    return key


# What ``wg`` lets follow a key it reads from a file or stdin: whitespace and NULs.
TRAILING_SPACE = b" \t\n\v\f\r\0"


def decode_file(data: bytes) -> bytes:
    """A key as ``wg`` reads it from a file or stdin (``wg genkey``'s output): its base64
    text, then nothing but whitespace. ValueError, as :func:`decode`, never quotes it."""
    try:
        text = data.rstrip(TRAILING_SPACE).decode("ascii")
    except UnicodeDecodeError:  # its message would show a byte of the key
        raise ValueError("not a WireGuard key: not base64 text") from None
    return decode(text)


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public). An all-zero result (a low-order public key) is refused, as
    WireGuard refuses it: it would make the shared secret known to anyone."""
    if len(private) != KEY_LEN or len(public) != KEY_LEN:
        raise ValueError(f"X25519 keys are {KEY_LEN} bytes")
    try:
        # libsodium clamps the scalar and fails on a low-order point (all-zero result).
        return crypto_scalarmult(private, public)
    except NaclRuntimeError:
        raise ValueError("X25519 gave the all-zero shared secret") from None
