"""Transport data in pure Python: the reference the C datapath is checked against, and what
the tests use. A counter nonce per message, a sliding replay window per receiving session."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Rejected
from .handshake import Keypair
from .messages import Transport
from .noise import aead_decrypt, aead_encrypt

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REPLAY_WINDOW = 8192 - 64  # what wireguard-go keeps; WireGuard needs at least 2048 - 32
PADDING = 16


def pad(packet: bytes) -> bytes:
    """Zero-pad a plaintext to a multiple of 16 bytes (the receiver trims by the IP length)."""
    return packet + bytes(-len(packet) % PADDING)


def seal(keypair: Keypair, counter: int, payload: bytes) -> bytes:
    return Transport(keypair.remote_index, counter,
                     aead_encrypt(keypair.send_key, counter, payload, b"")).encode()


def unseal(keypair: Keypair, msg: Transport) -> bytes:
    """The plaintext of `msg` under `keypair`, with no replay check; Rejected if it fails."""
    if msg.receiver != keypair.local_index:
        raise Rejected("transport message for another session")
    return aead_decrypt(keypair.receive_key, msg.counter, msg.encrypted, b"")


class ReplayWindow:
    """Counters seen: the highest one and a bitmap of the `size` below it (bit i: highest-i).
    A counter is accepted once, and not if it is `size` or more below the highest."""

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self._highest = -1
        self._bits = 0

    def fresh(self, counter: int) -> bool:
        """Would `counter` be accepted? (Checked before decrypting; marked only after.)"""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self._highest:
            return True
        behind = self._highest - counter
        return behind < self.size and not (self._bits >> behind) & 1

    def accept(self, counter: int) -> bool:
        if not self.fresh(counter):
            return False
        if counter > self._highest:
            shift = counter - self._highest
            # A jump past the whole window forgets it (and never shifts by 2^60 bits).
            kept = (self._bits << shift) & ((1 << self.size) - 1) if shift < self.size else 0
            self._bits = kept | 1
            self._highest = counter
        else:
            self._bits |= 1 << (self._highest - counter)
        return True


@dataclass(eq=False)
class Session:
    """A keypair in use: the next counter to send and the window of counters received."""
    keypair: Keypair
    send_counter: int = 0
    window: ReplayWindow = field(default_factory=ReplayWindow)
    received_any: bool = False

    def encrypt(self, payload: bytes) -> bytes:
        if self.send_counter >= REJECT_AFTER_MESSAGES:
            raise Rejected("session has sent its last message")
        counter, self.send_counter = self.send_counter, self.send_counter + 1
        return seal(self.keypair, counter, payload)

    def decrypt(self, msg: Transport) -> bytes:
        if not self.window.fresh(msg.counter):
            raise Rejected("replayed or too old counter")
        payload = unseal(self.keypair, msg)
        # Marked only once authenticated, so forged counters cannot move the window.
        self.window.accept(msg.counter)
        self.received_any = True
        return payload
