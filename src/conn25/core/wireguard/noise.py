"""The primitives of Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard instantiates them,
each from a real library: BLAKE2s and HMAC from hashlib/hmac, ChaCha20-Poly1305 and
XChaCha20-Poly1305 (cookies) from PyNaCl (libsodium), X25519 in `keys` (PyNaCl too).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from .errors import Rejected

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"


class DecryptError(Rejected):
    """An AEAD tag did not verify: wrong key, wrong data, or tampering."""


def hash_(*parts: bytes) -> bytes:
    """HASH: BLAKE2s-256 of the concatenation."""
    return hashlib.blake2s(b"".join(parts)).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC: keyed BLAKE2s with a 16-byte output (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF_n: HKDF over HMAC-BLAKE2s, n 32-byte outputs (n is 1, 2 or 3)."""
    prk = hmac_(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac_(prk, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def _nonce(counter: int) -> bytes:
    # Four zero bytes, then the counter as 64-bit little-endian.
    return b"\0\0\0\0" + struct.pack("<Q", counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _nonce(counter), key)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _nonce(counter), key)
    except CryptoError:
        raise DecryptError("authentication failed") from None


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except CryptoError:
        raise DecryptError("authentication failed") from None


# TAI64N: 8 bytes big-endian of 2^62 + 10 + seconds (the TAI label; 10 s is the TAI-UTC
# offset of 1970), then 4 bytes big-endian of nanoseconds. The nanoseconds are rounded down
# to a multiple of 2^24 so the timestamp does not leak a fine clock to the network.
_TAI64_BASE = (1 << 62) + 10
_WHITEN = ~((1 << 24) - 1)


def tai64n(wall: float) -> bytes:
    seconds = int(wall)
    nanos = int((wall - seconds) * 1e9) & _WHITEN
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos)
