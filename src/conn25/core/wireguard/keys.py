"""X25519 keys in WireGuard's format: 32 raw bytes, written as standard base64 (44 chars).

Keys made here and by `wg genkey` / `wg pubkey` are interchangeable.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_LEN = 32


def generate_private() -> bytes:
    """A fresh private key, clamped as `wg genkey` writes it (X25519 clamps on use anyway;
    clamping here only makes our keys look like wg's)."""
    key = bytearray(X25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_from_private(private: bytes) -> bytes:
    if len(private) != KEY_LEN:
        raise ValueError(f"a private key is {KEY_LEN} bytes, got {len(private)}")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def encode(key: bytes) -> str:
    if len(key) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, got {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode(text: str) -> bytes:
    """The 32 bytes of a base64 key; ValueError saying what is wrong (never echoing the text,
    which may be a private key)."""
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise ValueError(f"a WireGuard key is 44 base64 characters ending in '=', "
                         f"got {len(text)} characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a WireGuard key must be standard base64 (A-Z a-z 0-9 + /)") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"a WireGuard key decodes to {KEY_LEN} bytes, got {len(raw)}")
    return raw


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public). An all-zero result (a low-order public key) is refused, as
    WireGuard refuses it: it would make the shared secret known to anyone."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise ValueError("X25519 gave the all-zero shared secret") from None
    return shared
