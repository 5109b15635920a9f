"""One peer's WireGuard state, sans-IO: handshakes in both roles, the current/previous/next
sessions, and the timers. Every call takes `now` (monotonic seconds; `wall`, Unix seconds,
where a TAI64N timestamp is made) and returns bytes to send; `tick` returns what the timers
want done, `deadline` when to call it next.

Transport data runs here (`encrypt`/`decrypt`: the reference, and what the tests drive) or in
a datapath that holds the sessions' counters itself; such a driver tells the peer what the
datapath saw (`observe`, `confirmed`, `want_handshake`) and the timers run on that.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from . import keys
from .cookie import CookieGenerator
from .errors import Rejected
from .handshake import (
    ZERO_PSK,
    ConsumedInitiation,
    Identity,
    InitiatorState,
    Keypair,
    consume_response,
    create_initiation,
    create_response,
)
from .messages import CookieReply, Response, Transport
from .noise import tai64n
from .transport import REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES, Session

REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
JITTER_MAX = 0.333
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
INITIATION_MIN_INTERVAL = 1 / 50  # a peer's initiations are consumed at most 50 per second


def _random_index() -> int:
    return secrets.randbits(32)


def _random_jitter() -> float:
    return secrets.randbelow(334) / 1000


@dataclass(frozen=True)
class Randomness:
    """Where ephemeral keys, indices, jitter and nonces come from; tests pass fixed ones."""
    private_key: Callable[[], bytes] = keys.generate_private
    index: Callable[[], int] = _random_index
    jitter: Callable[[], float] = _random_jitter
    token: Callable[[int], bytes] = secrets.token_bytes


@dataclass(frozen=True)
class Send:
    """Send `data` to the peer's endpoint; `what` says which message it is."""
    data: bytes = field(repr=False)
    what: str


@dataclass(frozen=True)
class Keepalive:
    """Send a keepalive (an empty transport message) under the current session: `encrypt(b"")`
    here, or the datapath's own sealing where it holds the sessions."""
    what: str = "keepalive"


@dataclass(frozen=True)
class GaveUp:
    """No handshake completed within REKEY_ATTEMPT_TIME: drop what waits for this peer."""


Action = Send | Keepalive | GaveUp


@dataclass(frozen=True)
class Activity:
    """What a datapath that holds the sessions saw of the peer (monotonic seconds; None:
    never, or not since): the timers' inputs when `encrypt`/`decrypt` do not run here."""
    sent: float | None = None              # the last transport message sent
    data_unanswered: float | None = None   # first data sent since the last one received
    received_unanswered: float | None = None  # first data received since the last one sent


class Peer:
    def __init__(self, local: Identity, remote_static: bytes, *, psk: bytes = ZERO_PSK,
                 rand: Randomness | None = None,
                 new_index: Callable[[], int] | None = None,
                 persistent_keepalive: float = 0.0) -> None:
        self.local = local
        self.remote_static = remote_static
        self._psk = psk
        self._rand = rand or Randomness()
        self._new_index = new_index or self._rand.index
        self.cookies = CookieGenerator(remote_static)
        self.current: Session | None = None
        self.previous: Session | None = None
        self.next: Session | None = None
        self._pending: InitiatorState | None = None
        self._attempt_started = 0.0
        self._retransmit_at: float | None = None
        self._last_initiation_sent: float | None = None
        self._handshake_wanted = False
        self._keepalive_at: float | None = None
        self._new_handshake_at: float | None = None
        self._last_timestamp = b""
        self._last_initiation_consumed: float | None = None
        # A keepalive whenever nothing was sent for this long (0: off), so that the NATs on
        # the way keep their mapping; the first one goes out at once.
        self.persistent_keepalive = persistent_keepalive
        self._last_sent: float | None = None
        self._unanswered: tuple[float, float] | None = None  # (observed stamp, its deadline)

    def __repr__(self) -> str:
        return f"Peer({keys.encode(self.remote_static)})"

    # -- the initiator ------------------------------------------------------------------

    def begin_handshake(self, now: float, wall: float) -> bytes:
        """A fresh initiation; it is retransmitted by `tick` until answered or given up."""
        if self._pending is None:
            self._attempt_started = now
        msg, self._pending = create_initiation(self.local, self.remote_static,
                                               self._new_index(), self._rand.private_key(),
                                               tai64n(wall))
        self._handshake_wanted = False
        self._last_initiation_sent = now
        self._retransmit_at = now + REKEY_TIMEOUT + self._rand.jitter()
        return self.cookies.add_macs(msg.encode(), now)

    @property
    def handshaking(self) -> bool:
        return self._pending is not None

    @property
    def pending_index(self) -> int | None:
        return None if self._pending is None else self._pending.local_index

    def consume_response(self, msg: Response, now: float) -> Keypair:
        """The keypair of our handshake that `msg` answers (its macs already checked)."""
        if self._pending is None:
            raise Rejected("response with no handshake in flight")
        keypair = consume_response(self._pending, self.local, msg, now, self._psk)
        self._pending = None
        self._retransmit_at = None
        # The initiator may use the new session at once; the one it replaces stays for
        # what is still in flight. An unconfirmed `next` means the peer initiated too
        # (crossing handshakes): it sends under that one, so it is the one kept, as
        # wireguard-go and the kernel's module keep it.
        kept = self.next if self.next is not None else self.current
        self.previous, self.current, self.next = kept, Session(keypair), None
        self._authenticated_received()
        # The responder confirms the session only on our first transport message: send a
        # keepalive now unless data goes first.
        self._keepalive_at = now
        return keypair

    def consume_cookie_reply(self, msg: CookieReply, now: float) -> None:
        self.cookies.consume_reply(msg, now)

    # -- the responder ------------------------------------------------------------------

    def consume_initiation(self, init: ConsumedInitiation, now: float) -> tuple[bytes, Keypair]:
        """The response (with macs) to an authenticated initiation from this peer, and the
        keypair; Rejected for a replayed timestamp or a peer initiating too fast."""
        if init.timestamp <= self._last_timestamp:
            raise Rejected("initiation timestamp not newer than the last one (replay)")
        if (self._last_initiation_consumed is not None
                and now - self._last_initiation_consumed < INITIATION_MIN_INTERVAL):
            raise Rejected("initiations from this peer too fast")
        self._last_timestamp = init.timestamp
        self._last_initiation_consumed = now
        msg, keypair = create_response(init, self._new_index(), self._rand.private_key(), now,
                                       self._psk)
        # Unconfirmed until the initiator's first transport message arrives under it.
        self.next, self.previous = Session(keypair), None
        return self.cookies.add_macs(msg.encode(), now), keypair

    # -- transport ----------------------------------------------------------------------

    def encrypt(self, payload: bytes, now: float) -> bytes | None:
        """`payload` sealed under the current session, or None when there is no usable one
        (then `tick` starts a handshake; the caller keeps the packet until it completes)."""
        session = self.current
        if (session is None or not _usable(session, now)
                or session.send_counter >= REJECT_AFTER_MESSAGES):
            self._handshake_wanted = True
            return None
        data = session.encrypt(payload)
        self._keepalive_at = None
        self._last_sent = now
        if payload and self._new_handshake_at is None:
            # If nothing authenticated comes back, the peer may have lost our session.
            self._new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._rand.jitter()
        if session.keypair.is_initiator and (
                now - session.keypair.created >= REKEY_AFTER_TIME
                or session.send_counter >= REKEY_AFTER_MESSAGES):
            self._handshake_wanted = True
        return data

    def decrypt(self, msg: Transport, now: float) -> bytes:
        """The plaintext of a transport message (empty for a keepalive); Rejected if no live
        session of this peer authenticates it or its counter was seen."""
        session = next((s for s in (self.current, self.next, self.previous)
                        if s is not None and s.keypair.local_index == msg.receiver), None)
        if session is None:
            raise Rejected("no session with that index")
        if not _usable(session, now):
            raise Rejected("session expired")
        payload = session.decrypt(msg)
        if session is self.next:
            self.confirmed(session.keypair.local_index)
        self._authenticated_received()
        if payload and self._keepalive_at is None:
            self._keepalive_at = now + KEEPALIVE_TIMEOUT
        # The initiator renews a session nearing rejection when it hears on it, so the peer
        # is not left talking into a session about to die.
        current = self.current
        if (current is not None and current.keypair.is_initiator
                and now - current.keypair.created >= REKEY_ON_RECEIVE_AGE):
            self._handshake_wanted = True
        return payload

    def _authenticated_received(self) -> None:
        self._new_handshake_at = None

    # -- a datapath that holds the sessions ------------------------------------------------

    def confirmed(self, local_index: int) -> None:
        """The initiator used our `next` session (its first message authenticated under it):
        it becomes current."""
        if self.next is not None and self.next.keypair.local_index == local_index:
            self.previous, self.current, self.next = self.current, self.next, None

    def want_handshake(self) -> None:
        """A packet found no usable session, or the current one is due for a rekey."""
        self._handshake_wanted = True

    def observe(self, act: Activity) -> None:
        """The timers' inputs as the datapath saw them (instead of encrypt/decrypt)."""
        self._last_sent = act.sent
        self._keepalive_at = (None if act.received_unanswered is None
                              else act.received_unanswered + KEEPALIVE_TIMEOUT)
        if act.data_unanswered is None:
            self._unanswered = self._new_handshake_at = None
        elif self._unanswered is None or self._unanswered[0] != act.data_unanswered:
            self._unanswered = (act.data_unanswered, act.data_unanswered + KEEPALIVE_TIMEOUT
                                + REKEY_TIMEOUT + self._rand.jitter())
            self._new_handshake_at = self._unanswered[1]

    # -- timers -------------------------------------------------------------------------

    def tick(self, now: float, wall: float) -> list[Action]:
        actions: list[Action] = []
        self.current, self.previous, self.next = (
            s if s is not None and _usable(s, now) else None
            for s in (self.current, self.previous, self.next))
        if self._retransmit_at is not None and now >= self._retransmit_at:
            if now - self._attempt_started >= REKEY_ATTEMPT_TIME:
                self._pending = self._retransmit_at = None
                self._handshake_wanted = False
                self._new_handshake_at = None
                actions.append(GaveUp())
            else:
                actions.append(Send(self.begin_handshake(now, wall), "initiation"))
        if self._new_handshake_at is not None and now >= self._new_handshake_at:
            self._new_handshake_at = None
            self._handshake_wanted = True
        if self._handshake_wanted and self._pending is None:
            actions.append(Send(self.begin_handshake(now, wall), "initiation"))
        persistent_due = self.persistent_keepalive > 0 and (
            self._last_sent is None or now >= self._last_sent + self.persistent_keepalive)
        if persistent_due or (self._keepalive_at is not None and now >= self._keepalive_at):
            self._keepalive_at = None
            self._last_sent = now  # asked for once, whether or not a session can carry it
            actions.append(Keepalive())
        return actions

    def keepalive(self, now: float) -> bytes | None:
        """A keepalive sealed here (a Keepalive action, when transport runs in this object);
        None without a usable session (then a handshake is wanted)."""
        return self.encrypt(b"", now)

    def deadline(self) -> float | None:
        """When `tick` has something to do next (None: nothing until an event)."""
        times = [t for t in (self._retransmit_at, self._keepalive_at, self._new_handshake_at)
                 if t is not None]
        if self.persistent_keepalive > 0:
            times.append(-1.0 if self._last_sent is None
                         else self._last_sent + self.persistent_keepalive)
        times += [s.keypair.created + REJECT_AFTER_TIME
                  for s in (self.current, self.previous, self.next) if s is not None]
        return min(times, default=None)

    def local_indices(self) -> set[int]:
        """The indices this peer answers to (its pending handshake and its sessions)."""
        out = {s.keypair.local_index for s in (self.current, self.previous, self.next)
               if s is not None}
        if self._pending is not None:
            out.add(self._pending.local_index)
        return out


def _usable(session: Session, now: float) -> bool:
    return now - session.keypair.created < REJECT_AFTER_TIME
