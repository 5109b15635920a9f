"""A raw WireGuard member, for the end-to-end tests: a node's key (or one the tailnet does
not know) on a UDP socket in a namespace of the testbed, driving conn25.core.wireguard by
hand instead of through conn25d.

It does what a conn25d node never would, so that the target's checks can be tried: it seals
any inner packet (a forged source, a destination no app resolved, a reject), re-sends a
datagram verbatim, flips a bit, and seals under a key and session the target never agreed.

To speak for a node, stop that node's conn25d and bind where it was (its endpoint, port
41641): the target then sees the node where it expects it, and the node's restarted conn25d
simply makes a new handshake. The private key is read from the node's key file and stays
in this object: never on a command line, in a repr or in output.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..core.wireguard import keys
from ..core.wireguard.device import Device
from ..core.wireguard.errors import Rejected
from ..core.wireguard.handshake import Keypair
from ..core.wireguard.messages import INITIATION, TRANSPORT, message_type
from ..core.wireguard.transport import pad, seal
from ..daemon import keyfile, tailnetfile
from .netns import Netns
from .testbed import Testbed

DEFAULT_PORT = 41641
RETRANSMIT = 1.0  # an unanswered initiation is sent again after this long (a busy target)


def _source(addr: tuple[str, int]) -> bytes:
    """An address as the core's `receive` takes it: packed IP, then the port."""
    host, port = addr[0], addr[1]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.inet_pton(family, host) + port.to_bytes(2, "big")


class WgMember:
    """One peer of one target node. `handshake()` first (as the initiator), then `seal` and
    `send`; `received` collects what the target sends back."""

    def __init__(self, ns: Netns, bind: tuple[str, int], private: bytes, target_public: bytes,
                 target_endpoint: tuple[str, int], name: str = "member") -> None:
        self.name = name
        self.target = target_endpoint
        self.device = Device(private)
        self.peer = self.device.add_peer(target_public)
        family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET

        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_DGRAM)
            try:
                s.bind(bind)
            except BaseException:
                s.close()
                raise
            return s

        self.sock = ns.call(make)
        self.ignored = 0  # datagrams from the target this member did not act on

    def __repr__(self) -> str:
        return f"WgMember({self.name} -> {self.target[0]}:{self.target[1]})"

    @classmethod
    def of_node(cls, ns: Netns, tailnet_path: Path, name: str, key_path: Path,
                target: str, bind: tuple[str, int] | None = None) -> WgMember:
        """Node `name` (its private key in `key_path`, checked against its public key in the
        tailnet file) talking to node `target`, from `name`'s endpoint unless `bind`."""
        tailnet = tailnetfile.load_file(tailnet_path)
        me, them = tailnet.node(name), tailnet.node(target)
        if me is None or them is None:
            raise ValueError(f"{name if me is None else target} is not in {tailnet_path}")
        if them.endpoint is None:
            raise ValueError(f"{target} has no endpoint to send to")
        private = keyfile.read(key_path)
        if keys.public_from_private(private) != me.public_key:
            raise ValueError(f"{key_path} is not the key of {name} in {tailnet_path}")
        if bind is None:
            if me.endpoint is None:
                raise ValueError(f"{name} has no endpoint: say where to bind")
            bind = me.endpoint
        return cls(ns, bind, private, them.public_key, them.endpoint, name)

    @classmethod
    def stranger(cls, ns: Netns, tailnet_path: Path, target: str,
                 bind: tuple[str, int]) -> WgMember:
        """A key the tailnet file does not list, talking to node `target`."""
        tailnet = tailnetfile.load_file(tailnet_path)
        them = tailnet.node(target)
        if them is None or them.endpoint is None:
            raise ValueError(f"{target} is not in {tailnet_path} with an endpoint")
        return cls(ns, bind, keys.generate_private(), them.public_key, them.endpoint,
                   "stranger")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WgMember:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the handshake --------------------------------------------------------------------

    def handshake(self, timeout: float = 15) -> bool:
        """Initiate and wait (at most `timeout` s) for the response; then a keepalive, so the
        target's session is confirmed before anything else is sent. False if none came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(self.peer.begin_handshake(time.monotonic(), time.time()))
            retry = min(deadline, time.monotonic() + RETRANSMIT)
            while (self.peer.current is None
                   and self._receive_one(retry - time.monotonic()) is not None):
                pass
            if self.peer.current is not None:
                keepalive = self.peer.keepalive(time.monotonic())
                assert keepalive is not None
                self.send(keepalive)
                return True
        return False

    # -- sending ----------------------------------------------------------------------------

    def seal(self, packet: bytes) -> bytes:
        """`packet` (an IP packet; b"" for a keepalive) as the next transport message of the
        session."""
        data = self.peer.encrypt(pad(packet), time.monotonic())
        if data is None:
            raise RuntimeError(f"{self}: no session (handshake first)")
        return data

    def send(self, datagram: bytes, count: int = 1) -> None:
        """`datagram` as it is, `count` times (more than once: a replay)."""
        for _ in range(count):
            self.sock.sendto(datagram, self.target)

    def send_packets(self, packet: bytes, count: int = 1) -> None:
        """`packet` sealed `count` times, each under its own counter."""
        for _ in range(count):
            self.send(self.seal(packet))

    @staticmethod
    def flipped(datagram: bytes, bit: int = -1) -> bytes:
        """`datagram` with one bit of its sealed part inverted (default: the last bit of the
        tag); the header stays, so the target finds the session and fails to authenticate."""
        data = bytearray(datagram)
        index = len(data) - 1 if bit < 0 else 16 + bit // 8
        if not 16 <= index < len(data):
            raise ValueError("the bit must be in the sealed part")
        data[index] ^= 1 << (bit % 8 if bit >= 0 else 0)
        return bytes(data)

    @staticmethod
    def unagreed(packet: bytes, receiver: int | None = None, counter: int = 0) -> bytes:
        """`packet` sealed under a key no handshake agreed, to a receiver index the target
        may never have given (default: random): what someone without a session can send."""
        keypair = Keypair(send_key=secrets.token_bytes(32), receive_key=bytes(32),
                          local_index=0,
                          remote_index=secrets.randbits(32) if receiver is None else receiver,
                          created=0.0, is_initiator=True)
        return seal(keypair, counter, pad(packet))

    # -- receiving --------------------------------------------------------------------------

    def received(self, timeout: float, limit: int = 10000) -> list[bytes]:
        """The inner packets (padding cut by their IP length) the target sent within
        `timeout` s, at most `limit`; keepalives and anything not authentic left out."""
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < limit:
            payload = self._receive_one(deadline - time.monotonic())
            if payload is None:
                break
            if payload:
                out.append(_ip_cut(payload))
        return out

    def _receive_one(self, timeout: float) -> bytes | None:
        """Handle one datagram from the target (waiting at most `timeout` s): its transport
        plaintext, b"" for anything else; None when nothing came."""
        if timeout <= 0:
            return None
        self.sock.settimeout(timeout)
        try:
            data, src = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        with contextlib.suppress(Rejected):
            kind = message_type(data)
            # The target's own initiations are not answered: this member only initiates.
            if kind != INITIATION:
                r = self.device.receive(data, _source(src), time.monotonic())
                if kind == TRANSPORT and r.payload is not None:
                    return r.payload
                return b""
        self.ignored += 1
        return b""


def _ip_cut(payload: bytes) -> bytes:
    """An IP packet without the zero padding the transport added after it."""
    if payload[0] >> 4 == 4 and len(payload) >= 20:
        return payload[:int.from_bytes(payload[2:4], "big")]
    if payload[0] >> 4 == 6 and len(payload) >= 40:
        return payload[:40 + int.from_bytes(payload[4:6], "big")]
    return payload


@contextlib.contextmanager
def speaking_for(bed: Testbed, name: str, target: str,
                 timeout: float = 15) -> Iterator[WgMember]:
    """Node `name`'s key at `name`'s endpoint, handshaken with node `target`. A conn25d
    running on `name` is stopped first (the endpoint and the key are its) and started again
    afterwards; AssertionError if the target does not answer within `timeout` s."""
    running = name in bed.procs
    if running:
        bed.stop(name)
    try:
        with WgMember.of_node(bed.ns[name], bed.tailnet_path, name, bed.key_file(name),
                              target) as member:
            if not member.handshake(timeout):
                raise AssertionError(f"{target} did not answer {name}'s handshake within "
                                     f"{timeout}s")
            yield member
    finally:
        if running:
            bed.start(name)
