"""mac1, mac2 and cookie replies: WireGuard's defence against handshake floods.

mac1 (keyed by the receiver's public key) proves the sender knows whom it talks to; it is
always checked. Under load a responder also wants mac2, keyed by a cookie it gave the
sender's address in a cookie reply: a handshake is then only processed from an address that
can receive datagrams.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable

from .errors import Rejected
from .messages import TAG_LEN, CookieReply
from .noise import LABEL_COOKIE, LABEL_MAC1, hash_, mac, xaead_decrypt, xaead_encrypt

COOKIE_REFRESH_TIME = 120.0  # the responder's secret, and a cookie held, live this long
_MACS = 2 * TAG_LEN


def mac1_key(public: bytes) -> bytes:
    return hash_(LABEL_MAC1, public)


def cookie_key(public: bytes) -> bytes:
    return hash_(LABEL_COOKIE, public)


def _mac1_of(data: bytes) -> bytes:
    return data[-_MACS:-TAG_LEN]


class CookieChecker:
    """The receiving side, one per node: checks mac1 and mac2 and makes cookie replies."""

    def __init__(self, local_public: bytes,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self._mac1_key = mac1_key(local_public)
        self._cookie_key = cookie_key(local_public)
        self._random = random_bytes
        self._secret = b""
        self._secret_made: float | None = None

    def __repr__(self) -> str:
        return "CookieChecker()"

    def mac1_ok(self, data: bytes) -> bool:
        return hmac.compare_digest(mac(self._mac1_key, data[:-_MACS]), _mac1_of(data))

    def mac2_ok(self, data: bytes, source: bytes, now: float) -> bool:
        cookie = self._cookie(source, now)
        return hmac.compare_digest(mac(cookie, data[:-TAG_LEN]), data[-TAG_LEN:])

    def reply(self, data: bytes, sender: int, source: bytes, now: float) -> bytes:
        """The cookie reply to handshake message `data` (from index `sender`, at `source`)."""
        nonce = self._random(24)
        sealed = xaead_encrypt(self._cookie_key, nonce, self._cookie(source, now),
                               _mac1_of(data))
        return CookieReply(sender, nonce, sealed).encode()

    def _cookie(self, source: bytes, now: float) -> bytes:
        # The secret changes every two minutes, so a cookie is good for at most that long.
        if self._secret_made is None or now - self._secret_made >= COOKIE_REFRESH_TIME:
            self._secret, self._secret_made = self._random(32), now
        return mac(self._secret, source)


class CookieGenerator:
    """The sending side, one per peer: adds mac1 (and mac2 while a cookie is fresh) and
    takes the cookie out of a cookie reply."""

    def __init__(self, remote_public: bytes) -> None:
        self._mac1_key = mac1_key(remote_public)
        self._cookie_key = cookie_key(remote_public)
        self._cookie: bytes | None = None
        self._cookie_time = 0.0
        self._last_mac1: bytes | None = None

    def __repr__(self) -> str:
        return f"CookieGenerator(has_cookie={self._cookie is not None})"

    def add_macs(self, data: bytes, now: float) -> bytes:
        body = data[:-_MACS]
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        mac2 = bytes(TAG_LEN)
        if self._cookie is not None and now - self._cookie_time < COOKIE_REFRESH_TIME:
            mac2 = mac(self._cookie, body + mac1)
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> None:
        """Store the cookie; Rejected unless the reply answers the last message we sent."""
        if self._last_mac1 is None:
            raise Rejected("cookie reply to nothing we sent")
        cookie = xaead_decrypt(self._cookie_key, reply.nonce, reply.encrypted_cookie,
                               self._last_mac1)
        # One reply per message sent: a replayed reply finds nothing to answer.
        self._last_mac1 = None
        self._cookie, self._cookie_time = cookie, now
