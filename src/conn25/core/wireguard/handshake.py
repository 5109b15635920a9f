"""The Noise_IKpsk2 handshake as WireGuard constructs it, as pure functions: create and
consume an initiation, create and consume a response. mac1/mac2 are added and checked by
`cookie`; timestamps and rate limits are judged by `peer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import keys
from .errors import Rejected
from .messages import Initiation, Response
from .noise import (
    CONSTRUCTION,
    IDENTIFIER,
    aead_decrypt,
    aead_encrypt,
    hash_,
    kdf,
)

ZERO_PSK = bytes(32)
_C0 = hash_(CONSTRUCTION)
_H0 = hash_(_C0, IDENTIFIER)


@dataclass(frozen=True, slots=True)
class Identity:
    """Our static key pair."""
    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> Identity:
        return cls(private, keys.public_from_private(private))


@dataclass(frozen=True, slots=True)
class Keypair:
    """The result of a handshake: what the datapath installs for one session."""
    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    created: float
    is_initiator: bool


@dataclass(frozen=True, slots=True)
class InitiatorState:
    """What the initiator keeps between sending an initiation and consuming the response."""
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)
    ephemeral_private: bytes = field(repr=False)
    local_index: int
    remote_static: bytes


@dataclass(frozen=True, slots=True)
class ConsumedInitiation:
    """An initiation that authenticated: who sent it, when (TAI64N) and the state to answer."""
    remote_static: bytes
    timestamp: bytes
    remote_index: int
    remote_ephemeral: bytes
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return keys.dh(private, public)
    except ValueError:
        raise Rejected("a low-order public key") from None


def create_initiation(local: Identity, remote_static: bytes, local_index: int,
                      ephemeral_private: bytes, timestamp: bytes,
                      ) -> tuple[Initiation, InitiatorState]:
    """The initiation (mac1/mac2 still zero) and the state to consume its response.
    `timestamp` is the TAI64N timestamp to seal into it."""
    h = hash_(_H0, remote_static)
    ephemeral = keys.public_from_private(ephemeral_private)
    (c,) = kdf(_C0, ephemeral, 1)
    h = hash_(h, ephemeral)
    c, k = kdf(c, _dh(ephemeral_private, remote_static), 2)
    encrypted_static = aead_encrypt(k, 0, local.public, h)
    h = hash_(h, encrypted_static)
    c, k = kdf(c, _dh(local.private, remote_static), 2)
    encrypted_timestamp = aead_encrypt(k, 0, timestamp, h)
    h = hash_(h, encrypted_timestamp)
    msg = Initiation(local_index, ephemeral, encrypted_static, encrypted_timestamp)
    return msg, InitiatorState(c, h, ephemeral_private, local_index, remote_static)


def consume_initiation(local: Identity, msg: Initiation) -> ConsumedInitiation:
    """Decrypt and authenticate an initiation addressed to `local`; Rejected if it does not."""
    h = hash_(_H0, local.public)
    (c,) = kdf(_C0, msg.ephemeral, 1)
    h = hash_(h, msg.ephemeral)
    c, k = kdf(c, _dh(local.private, msg.ephemeral), 2)
    remote_static = aead_decrypt(k, 0, msg.encrypted_static, h)
    h = hash_(h, msg.encrypted_static)
    c, k = kdf(c, _dh(local.private, remote_static), 2)
    timestamp = aead_decrypt(k, 0, msg.encrypted_timestamp, h)
    h = hash_(h, msg.encrypted_timestamp)
    return ConsumedInitiation(remote_static, timestamp, msg.sender, msg.ephemeral, c, h)


def create_response(consumed: ConsumedInitiation, local_index: int, ephemeral_private: bytes,
                    now: float, psk: bytes = ZERO_PSK) -> tuple[Response, Keypair]:
    """The response to an initiation (macs still zero) and the responder's keypair."""
    c, h = consumed.chaining_key, consumed.hash
    ephemeral = keys.public_from_private(ephemeral_private)
    (c,) = kdf(c, ephemeral, 1)
    h = hash_(h, ephemeral)
    (c,) = kdf(c, _dh(ephemeral_private, consumed.remote_ephemeral), 1)
    (c,) = kdf(c, _dh(ephemeral_private, consumed.remote_static), 1)
    c, tau, k = kdf(c, psk, 3)
    h = hash_(h, tau)
    encrypted_nothing = aead_encrypt(k, 0, b"", h)
    receive, send = kdf(c, b"", 2)
    msg = Response(local_index, consumed.remote_index, ephemeral, encrypted_nothing)
    return msg, Keypair(send, receive, local_index, consumed.remote_index, now, False)


def consume_response(state: InitiatorState, local: Identity, msg: Response, now: float,
                     psk: bytes = ZERO_PSK) -> Keypair:
    """The initiator's keypair from the response to `state`; Rejected if it does not verify."""
    if msg.receiver != state.local_index:
        raise Rejected("response to another handshake")
    c, h = state.chaining_key, state.hash
    (c,) = kdf(c, msg.ephemeral, 1)
    h = hash_(h, msg.ephemeral)
    (c,) = kdf(c, _dh(state.ephemeral_private, msg.ephemeral), 1)
    (c,) = kdf(c, _dh(local.private, msg.ephemeral), 1)
    c, tau, k = kdf(c, psk, 3)
    h = hash_(h, tau)
    aead_decrypt(k, 0, msg.encrypted_nothing, h)
    send, receive = kdf(c, b"", 2)
    return Keypair(send, receive, state.local_index, msg.sender, now, True)
