"""The DNS shell: a UDP+TCP server, an upstream forwarder, and the client's
resolver that sends app-domain queries to a connector and answers only after
the connector acknowledged the new mappings (BEHAVIOURS 28).

The mapping itself is sans-IO (:mod:`conn25.core.dnsmap`); this module owns the
sockets, the deadlines and the counters. Nothing here trusts its input: a
datagram that is not a query is dropped or answered FORMERR/NOTIMP, an
upstream answer that does not echo the query's id and question is ignored
(a spoofing attempt or a stale answer), and every failure on the way out
becomes SERVFAIL for that one query.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from dnslib.label import DNSBuffer

from ..core.assignments import Assignment
from ..core.config import App, NodeConfig
from ..core.dnscache import AnswerCache, question_key
from ..core.dnsmap import DNSMapError, DNSMapper, servfail
from ..core.iprange import IPAddress, IPNetwork, parse_address
from ..core.tailnet import parse_endpoint
from .refusals import RefusalLog

__all__ = [
    "ClientResolver",
    "DNSServer",
    "Forwarder",
    "SourcePolicy",
    "kernel_says_local",
    "parse_dns_allow",
    "parse_upstreams",
    "upstreams_from_resolv_conf",
]

log = logging.getLogger(__name__)

DNS_PORT = 53
UDP_LIMIT = 512  # RFC 1035 limit for a client that sent no EDNS0 OPT record
EDNS_PAYLOAD = 1232  # what we advertise in a truncated answer (DNS flag day 2020)
MAX_MESSAGE = 65535  # the TCP length prefix is 16 bits
_RETRY_NEXT = frozenset((RCODE.SERVFAIL, RCODE.NOTIMP, RCODE.REFUSED))  # as glibc's res_send
_MAX_LOGGED_REASONS = 1024

# Counters, all present from the start (zero) so that metrics keep a stable shape.
FORWARDER_COUNTERS = (
    "upstream_queries", "upstream_answered", "upstream_servfail", "upstream_overload",
    "upstream_timeouts", "upstream_errors", "upstream_refusals", "upstream_mismatched",
    "upstream_tcp_fallbacks",
)
SERVER_COUNTERS = (
    "udp_queries", "tcp_queries", "tcp_connections", "tcp_idle_closed", "truncated",
    "formerr", "notimp", "dropped_garbage", "dropped_responses", "dropped_busy",
    "answer_timeouts", "answer_errors", "internal_errors",
    "refused_source", "tcp_evicted", "tcp_refused_per_source", "tcp_refused_busy",
)
RESOLVER_COUNTERS = (
    "queries", "forwarded", "app_queries", "answered_mapped", "answered_cached",
    "assignments_new",
    "registrations", "servfail_connector", "servfail_mapping", "servfail_ack_timeout",
    "servfail_register",
)

Upstream = tuple[str, int]
Answer = Callable[[bytes], Awaitable[bytes]]
Cached = Callable[[bytes], bytes | None]


# -- message helpers -----------------------------------------------------------------------------


class _Head:
    """Id, flags and questions of a message, read without touching its records."""

    __slots__ = ("flags", "id", "questions")

    def __init__(self, wire: bytes) -> None:
        buf = DNSBuffer(wire)
        try:
            header = DNSHeader.parse(buf)
            questions = [DNSQuestion.parse(buf) for _ in range(header.q)]
        except Exception as e:
            raise DNSMapError(f"unreadable DNS message: {e}") from None
        self.id: int = header.id
        self.flags: int = header.bitmap
        # Names compare ASCII-case-insensitively (RFC 4343): upstreams may not echo 0x20 case.
        self.questions = [
            (tuple(part.lower() for part in q.qname.label), q.qtype, q.qclass) for q in questions
        ]

    @property
    def qr(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def tc(self) -> bool:
        return bool(self.flags & 0x0200)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    def answered_by(self, response: _Head) -> bool:
        return (
            response.qr
            and response.id == self.id
            and response.opcode == self.opcode
            and response.questions == self.questions
        )


def _query_head(query: bytes) -> _Head:
    head = _Head(query)
    if head.qr:
        raise DNSMapError("DNS message is a response (QR set), not a query")
    return head


def _answers(query: _Head, wire: bytes) -> _Head | None:
    """The head of ``wire`` when it is a response to ``query``, else None."""
    try:
        head = _Head(wire)
    except DNSMapError:
        return None
    return head if query.answered_by(head) else None


def _with_rcode(wire: bytes, rcode: int) -> bytes:
    out = bytearray(wire)
    out[3] = (out[3] & 0xF0) | rcode
    return bytes(out)


def _with_id(wire: bytes, query: bytes) -> bytes:
    return query[:2] + wire[2:]


class _Framer:
    """DNS over TCP: messages with a 2-byte length prefix (RFC 1035 §4.2.2).

    Bytes already read survive a cancelled :meth:`receive`, so a caller may
    wrap it in a timeout and call again.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def receive(self) -> bytes | None:
        """The next message; None at end of stream (a half-sent message is dropped)."""
        while True:
            if len(self._buf) >= 2:
                size = int.from_bytes(self._buf[:2], "big")
                if len(self._buf) >= 2 + size:
                    msg = bytes(self._buf[2 : 2 + size])
                    del self._buf[: 2 + size]
                    return msg
            data = await self.stream.receive_some(MAX_MESSAGE + 2)
            if not data:
                return None
            self._buf += data

    @staticmethod
    def frame(msg: bytes) -> bytes:
        return len(msg).to_bytes(2, "big") + msg


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _show(upstream: Upstream) -> str:
    host, port = upstream
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- upstream configuration ----------------------------------------------------------------------


def parse_upstreams(text: str) -> list[Upstream]:
    """The value of ``--upstream-dns ADDR[,ADDR]`` as [(ip, port)], port 53 by default.

    ADDR is ``1.2.3.4``, ``1.2.3.4:5353``, ``2001:db8::1`` or
    ``[2001:db8::1]:53``. ValueError names the bad item.
    """
    out: list[Upstream] = []
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        if not item:
            raise ValueError(f"--upstream-dns {text!r}: address {i + 1} is empty")
        try:
            out.append(parse_endpoint(item, default_port=DNS_PORT))
        except ValueError as e:
            raise ValueError(f"--upstream-dns: {e}") from None
    return out


def upstreams_from_resolv_conf(
    path: str = "/etc/resolv.conf", exclude: Iterable[str] = ()
) -> list[Upstream]:
    """The ``nameserver`` addresses of a resolv.conf as [(ip, 53)], in file order.

    Addresses in ``exclude`` (the DNS server's own listen address: asking
    ourselves would loop) are left out, as are duplicates and lines that do
    not hold an IP address. A missing file gives no upstreams (DESIGN §6:
    non-app queries then get SERVFAIL with a logged reason).
    """
    skip = {parse_address(a) for a in exclude}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    out: list[Upstream] = []
    seen: set[IPAddress] = set()
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(fields[1])
        except ValueError:
            log.warning("%s:%d: nameserver %r is not an IP address, ignored", path, number,
                        fields[1])
            continue
        # A scoped (link-local) address keeps its %zone for connect(); compare without it.
        bare = ipaddress.ip_address(str(addr).partition("%")[0])
        if bare in skip or addr in seen:
            continue
        seen.add(addr)
        out.append((str(addr), DNS_PORT))
    return out


def parse_dns_allow(text: str) -> tuple[IPNetwork, ...]:
    """The value of ``--dns-allow CIDR[,CIDR]``; ValueError names the bad item."""
    out: list[IPNetwork] = []
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        if not item:
            raise ValueError(f"--dns-allow {text!r}: network {i + 1} is empty")
        try:
            out.append(ipaddress.ip_network(item))
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"--dns-allow: {item!r} is not a network (CIDR such as "
                                 f"192.0.2.0/24 or 2001:db8::/32, or one address)") from None
            raise ValueError(f"--dns-allow: {item!r} has host bits set; did you mean "
                             f"{loose}?") from None
    return tuple(out)


def kernel_says_local(addr: IPAddress) -> bool:
    """Whether the kernel delivers ``addr`` locally (its route is of type RTN_LOCAL).

    The kernel's own answer covers every address of every interface, 127/8
    included, and addresses added later, with nothing to keep in sync.
    """
    from pyroute2 import IPRoute  # netlink; imported here so the module loads without it

    global _ipr
    if _ipr is None:
        _ipr = IPRoute()
    try:
        routes = _ipr.route("get", dst=str(addr))
    except Exception:  # no route at all (ENETUNREACH): certainly not local
        return False
    return bool(routes) and routes[0]["type"] == _RTN_LOCAL


_ipr: Any = None
_RTN_LOCAL = 2


class SourcePolicy:
    """Who the client's DNS server answers: this host itself, plus ``allowed`` networks.

    "This host" is a source address the kernel delivers locally. Such a source
    can only come from a local process: the kernel drops packets that arrive
    on another interface with one of its own addresses as their source
    (martian), and the datapath drops overlay packets whose source is not the
    sending peer's. Asking the kernel costs a netlink round trip, so answers
    (both ways) are kept ``ttl`` seconds per address: a flood from one source
    costs a dict lookup per query.
    """

    def __init__(
        self,
        allowed: tuple[IPNetwork, ...] = (),
        *,
        is_local: Callable[[IPAddress], bool] = kernel_says_local,
        ttl: float = 5.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed = allowed
        self._is_local = is_local
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._cache: dict[IPAddress, tuple[bool, float]] = {}
        self._decided: dict[str, tuple[bool, float]] = {}  # by address as the socket gave it

    def allows_host(self, host: str) -> bool:
        """:meth:`allows` for an address as a socket reports it, decided once per ``ttl``:
        on the path of every query, a dict lookup instead of parsing the address."""
        now = self._clock()
        hit = self._decided.get(host)
        if hit is not None and now < hit[1]:
            return hit[0]
        addr = _source_address((host,))
        allowed = addr is not None and self.allows(addr)
        if len(self._decided) >= self.max_entries:
            self._decided.clear()
        self._decided[host] = (allowed, now + self.ttl)
        return allowed

    def is_local(self, addr: IPAddress) -> bool:
        now = self._clock()
        hit = self._cache.get(addr)
        if hit is not None and now < hit[1]:
            return hit[0]
        if len(self._cache) >= self.max_entries:
            self._cache.clear()  # a flood of sources: start over rather than grow
        local = self._is_local(addr)
        self._cache[addr] = (local, now + self.ttl)
        return local

    def allows(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.allowed) or self.is_local(addr)


def _source_address(client: Any) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(str(client[0]).partition("%")[0])
    except (ValueError, IndexError, TypeError):
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


# -- forwarder -----------------------------------------------------------------------------------


class _UpstreamError(Exception):
    pass


class Forwarder:
    """Sends queries to the upstream resolvers, in order, and returns the first good answer.

    Per upstream: UDP on a socket of its own (connected, so only the
    upstream's address can answer), datagrams that do not echo the query's
    id and question ignored until ``timeout``; a truncated answer is asked
    again over TCP. A timeout, a socket error or a SERVFAIL/NOTIMP/REFUSED
    answer moves on to the next upstream (the last such answer is returned
    when no upstream does better). No upstream, or none answering, gives a
    SERVFAIL built from the query and a log line once per reason.

    At most ``max_inflight`` queries are forwarded at once; more get
    SERVFAIL at once rather than queueing without bound.
    """

    def __init__(
        self, upstreams: list[Upstream], timeout: float = 2.0, *, max_inflight: int = 512
    ) -> None:
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self._limiter = trio.CapacityLimiter(max_inflight)
        self._counters = Counter(dict.fromkeys(FORWARDER_COUNTERS, 0))
        self._logged: dict[Upstream | None, set[str]] = {}

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    async def forward(self, query: bytes) -> bytes:
        """The upstream answer to ``query``, else SERVFAIL.

        DNSMapError when ``query`` is not a readable DNS query (the caller
        decides how to refuse it).
        """
        head = _query_head(query)
        self._counters["upstream_queries"] += 1
        if not self.upstreams:
            return self._fail(query, None, "no upstream DNS server configured (see --upstream-dns)")
        token = object()
        try:
            self._limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            self._counters["upstream_overload"] += 1
            return self._fail(query, None,
                              f"more than {self._limiter.total_tokens} queries in flight upstream")
        try:
            return await self._forward(query, head)
        finally:
            self._limiter.release_on_behalf_of(token)

    async def _forward(self, query: bytes, head: _Head) -> bytes:
        fallback: bytes | None = None
        for upstream in list(self.upstreams):
            where = _show(upstream)
            try:
                with trio.fail_after(self.timeout):
                    resp, rhead = await self._udp(upstream, query, head)
            except trio.TooSlowError:
                self._counters["upstream_timeouts"] += 1
                self._log_once(upstream, f"DNS upstream {where}: no answer within {self.timeout}s")
                continue
            except OSError as e:
                self._counters["upstream_errors"] += 1
                self._log_once(upstream, f"DNS upstream {where} over UDP: {e}")
                continue
            if rhead.tc:
                self._counters["upstream_tcp_fallbacks"] += 1
                fallback = resp  # truncated beats SERVFAIL: the client can retry over TCP
                try:
                    with trio.fail_after(self.timeout):
                        resp, rhead = await self._tcp(upstream, query, head)
                except (trio.TooSlowError, OSError, _UpstreamError) as e:
                    self._counters["upstream_errors"] += 1
                    why = "no answer in time" if isinstance(e, trio.TooSlowError) else str(e)
                    self._log_once(upstream, f"DNS upstream {where} over TCP: {why}")
                    continue
            # It answers again: log its next failure, and the next "none answered".
            self._logged.pop(upstream, None)
            self._logged.pop(None, None)
            if rhead.rcode in _RETRY_NEXT:
                self._counters["upstream_refusals"] += 1
                fallback = resp
                continue
            self._counters["upstream_answered"] += 1
            return resp
        if fallback is not None:
            self._counters["upstream_answered"] += 1
            return fallback
        return self._fail(query, None, "no DNS upstream answered "
                                       f"({', '.join(_show(u) for u in self.upstreams)})")

    async def _udp(self, upstream: Upstream, query: bytes, head: _Head) -> tuple[bytes, _Head]:
        with trio.socket.socket(_family(upstream[0]), socket.SOCK_DGRAM) as sock:
            await sock.connect(upstream)
            await sock.send(query)
            while True:
                data = await sock.recv(MAX_MESSAGE)
                rhead = _answers(head, data)
                if rhead is not None:
                    return data, rhead
                self._counters["upstream_mismatched"] += 1

    async def _tcp(self, upstream: Upstream, query: bytes, head: _Head) -> tuple[bytes, _Head]:
        stream = await trio.open_tcp_stream(*upstream)
        async with stream:
            await stream.send_all(_Framer.frame(query))
            framer = _Framer(stream)
            while True:
                data = await framer.receive()
                if data is None:
                    raise _UpstreamError("connection closed before the answer")
                rhead = _answers(head, data)
                if rhead is not None:
                    return data, rhead
                self._counters["upstream_mismatched"] += 1

    def _fail(self, query: bytes, key: Upstream | None, reason: str) -> bytes:
        self._counters["upstream_servfail"] += 1
        self._log_once(key, reason + "; answering SERVFAIL")
        return servfail(query)

    def _log_once(self, key: Upstream | None, reason: str) -> None:
        reasons = self._logged.setdefault(key, set())
        if reason in reasons or len(reasons) >= _MAX_LOGGED_REASONS:
            return
        reasons.add(reason)
        log.warning("%s", reason)


# -- server --------------------------------------------------------------------------------------


class _TCPConnection:
    """What the server knows of one TCP connection, to pick one to evict."""

    __slots__ = ("last_active", "queries", "scope", "source")

    def __init__(self, source: IPAddress, now: float, queries: trio.CapacityLimiter) -> None:
        self.source = source
        self.last_active = now  # the last query received or answer sent
        self.queries = queries  # one token per query in progress
        self.scope = trio.CancelScope()

    @property
    def busy(self) -> bool:
        return self.queries.borrowed_tokens > 0


class DNSServer:
    """A DNS server on UDP and TCP at ``listen``; ``answer`` makes each response.

    Every query runs in a task of its own; at most ``max_queries`` at once
    (UDP beyond that is dropped, TCP waits). Input that is not a query is
    dropped (shorter than a header, or a response: answering those could
    start a loop) or answered FORMERR (bad question section, not exactly one
    question) or NOTIMP (an opcode other than QUERY). ``answer`` raising or
    taking longer than ``answer_timeout`` gives SERVFAIL. A UDP answer larger
    than the client accepts (512 bytes, or the payload size of its EDNS0 OPT
    record) goes out truncated, TC set, so that the client asks over TCP.
    TCP connections carry several queries, answered as they complete, and
    close after ``tcp_idle_timeout`` without a query.

    With ``sources``, only sources it allows get an answer; others are
    dropped (UDP) or closed unanswered (TCP), counted and logged as summaries
    through ``refusals``. At most ``max_tcp_connections`` TCP connections are
    open: a new one evicts the longest-idle connection that has no query in
    progress (every local process shares one source address, so a per-source
    cap alone would not keep one process from locking out the others), and a
    source that is not local may hold at most ``tcp_connections_per_source``.

    ``cached``, when given, is asked first for each UDP datagram and answers
    synchronously, in the receive loop, without a task of its own: the cheap
    path for repeated questions. It returns None for anything it does not
    answer (which then takes the way above, validation included).
    """

    def __init__(
        self,
        listen: Upstream,
        answer: Answer,
        *,
        cached: Cached | None = None,
        max_queries: int = 256,
        max_tcp_connections: int = 64,
        tcp_queries_per_connection: int = 16,
        tcp_idle_timeout: float = 10.0,
        answer_timeout: float = 10.0,
        tcp_connections_per_source: int = 8,
        sources: SourcePolicy | None = None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.listen = listen
        self.answer = answer
        self.cached = cached
        self.address: Upstream | None = None  # bound address, set once serving
        self.tcp_idle_timeout = tcp_idle_timeout
        self.answer_timeout = answer_timeout
        self.sources = sources
        self.refusals = refusals if refusals is not None else RefusalLog(log)
        self._queries = trio.CapacityLimiter(max_queries)
        self._max_connections = max_tcp_connections
        self._per_source_cap = tcp_connections_per_source
        self._tcp: dict[_TCPConnection, None] = {}  # open connections, oldest first
        self._tcp_per_source: Counter[IPAddress] = Counter()
        self._per_connection = tcp_queries_per_connection
        self._counters = Counter(dict.fromkeys(SERVER_COUNTERS, 0))

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    async def run(
        self, *, task_status: trio.TaskStatus[Upstream] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``task_status.started((ip, port))`` once bound."""
        udp, tcp = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp)
                nursery.start_soon(self._serve_tcp, tcp)
                log.info("DNS server listening on %s (UDP and TCP)", _show(self.address))
                task_status.started(self.address)
        finally:
            udp.close()
            tcp.close()

    async def _bind(self) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
        host, port = self.listen
        family = _family(host)
        # Port 0 picks a free UDP port; the TCP side may find that port taken: try another.
        for _ in range(1 if port else 20):
            udp = trio.socket.socket(family, socket.SOCK_DGRAM)
            tcp = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await udp.bind((host, port))
                bound = udp.getsockname()[1]
                await tcp.bind((host, bound))
                tcp.listen(128)
            except OSError as e:
                udp.close()
                tcp.close()
                if port or e.errno != 98:  # EADDRINUSE
                    raise OSError(e.errno, f"DNS server cannot listen on {_show(self.listen)}: "
                                           f"{e.strerror}") from None
                continue
            self.address = (host, bound)
            return udp, tcp
        raise OSError(98, f"DNS server found no port free for both UDP and TCP on {host}")

    # -- UDP --

    async def _serve_udp(self, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, client = await sock.recvfrom(MAX_MESSAGE)
                except OSError as e:  # e.g. a late ICMP error; the socket is still fine
                    log.debug("DNS server: UDP receive error: %s", e)
                    continue
                if not self._allowed(client, "UDP"):
                    continue
                if self.cached is not None and await self._udp_cached(sock, data, client):
                    continue
                token = object()
                try:
                    self._queries.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    self._counters["dropped_busy"] += 1
                    continue
                nursery.start_soon(self._udp_query, sock, data, client, token)

    async def _udp_cached(self, sock: trio.socket.SocketType, data: bytes, client: Any) -> bool:
        """Whether ``cached`` answered ``data`` (and the answer fits in a plain UDP reply)."""
        assert self.cached is not None
        try:
            reply = self.cached(data)
        except Exception:
            self._internal_error(data)
            return False
        if reply is None or len(reply) > UDP_LIMIT:
            return False
        self._counters["udp_queries"] += 1
        try:
            await sock.sendto(reply, client)
        except OSError as e:
            log.debug("DNS server: cannot answer %s over UDP: %s", client, e)
        return True

    async def _udp_query(
        self, sock: trio.socket.SocketType, data: bytes, client: Any, token: object
    ) -> None:
        try:
            self._counters["udp_queries"] += 1
            checked = self._check(data)
            if checked is None:
                return
            if isinstance(checked, bytes):
                reply = checked
            else:
                reply = self._fit(checked, await self._answer(data))
            await sock.sendto(reply, client)
        except OSError as e:
            log.debug("DNS server: cannot answer %s over UDP: %s", client, e)
        except Exception:
            self._internal_error(data)
        finally:
            self._queries.release_on_behalf_of(token)

    def _fit(self, rec: DNSRecord, reply: bytes) -> bytes:
        """``reply`` if the UDP client takes it, else a truncated answer with TC set."""
        opt = next((rr for rr in rec.ar if rr.rtype == QTYPE.OPT), None)
        limit = UDP_LIMIT if opt is None else max(UDP_LIMIT, opt.rclass)
        if len(reply) <= limit:
            return reply
        self._counters["truncated"] += 1
        flags = struct.unpack_from("!H", reply, 2)[0] if len(reply) >= 4 else 0x8180
        out = DNSRecord(DNSHeader(id=rec.header.id, bitmap=flags, tc=1), questions=rec.questions)
        if opt is not None:
            out.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
        return bytes(out.pack())

    # -- TCP --

    async def _serve_tcp(self, sock: trio.socket.SocketType) -> None:
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:  # e.g. EMFILE: keep serving the connections we have
                    log.warning("DNS server: TCP accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                conn = self._admit(stream)
                if conn is None:
                    stream.socket.close()  # unanswered
                    continue
                nursery.start_soon(self._tcp_connection, stream, conn)

    def _admit(self, stream: trio.SocketStream) -> _TCPConnection | None:
        """Register a new connection, evicting an idle one when full; None: refuse it."""
        try:
            client = stream.socket.getpeername()
        except OSError:
            return None
        if not self._allowed(client, "TCP"):
            return None
        source = _source_address(client)
        if source is None:  # not an IP peer: nothing to account it to
            return None
        # Local processes share one address: for them only eviction is fair.
        local = self.sources is None or self.sources.is_local(source)
        if not local and self._tcp_per_source[source] >= self._per_source_cap:
            self._counters["tcp_refused_per_source"] += 1
            self.refusals.refuse(str(source), "dns_tcp_per_source",
                                 f"over {self._per_source_cap} TCP connections to the DNS server")
            return None
        if len(self._tcp) >= self._max_connections:
            victim = min((c for c in self._tcp if not c.busy), key=lambda c: c.last_active,
                         default=None)
            if victim is None:  # every connection has a query in progress
                self._counters["tcp_refused_busy"] += 1
                return None
            self._counters["tcp_evicted"] += 1
            self._forget(victim)
            victim.scope.cancel()
        conn = _TCPConnection(source, trio.current_time(), trio.CapacityLimiter(
            self._per_connection))
        self._tcp[conn] = None
        self._tcp_per_source[source] += 1
        return conn

    def _forget(self, conn: _TCPConnection) -> None:
        if self._tcp.pop(conn, False) is None:
            self._tcp_per_source[conn.source] -= 1
            if self._tcp_per_source[conn.source] <= 0:
                del self._tcp_per_source[conn.source]

    def _allowed(self, client: Any, transport: str) -> bool:
        """Whether to answer ``client``; a refusal is counted and summarised."""
        if self.sources is None or self.sources.allows_host(str(client[0])):
            return True
        self._counters["refused_source"] += 1
        self.refusals.refuse(str(client[0]), "dns_source",
                             f"{transport} query from a source this DNS server does not answer "
                             "(only this host and --dns-allow networks)")
        return False

    async def _tcp_connection(self, stream: trio.SocketStream, conn: _TCPConnection) -> None:
        self._counters["tcp_connections"] += 1
        lock = trio.Lock()
        per_connection = conn.queries
        try:
            with conn.scope:
                async with stream, trio.open_nursery() as nursery:
                    framer = _Framer(stream)
                    try:
                        while True:
                            with trio.move_on_after(self.tcp_idle_timeout) as idle:
                                data = await framer.receive()
                            if idle.cancelled_caught:
                                if conn.busy:
                                    continue  # answers still pending: the connection is not idle
                                self._counters["tcp_idle_closed"] += 1
                                break
                            if data is None:
                                break  # pending answers still go out before the stream closes
                            conn.last_active = trio.current_time()
                            qtoken = object()
                            await per_connection.acquire_on_behalf_of(qtoken)
                            try:
                                await self._queries.acquire_on_behalf_of(qtoken)
                            except BaseException:
                                per_connection.release_on_behalf_of(qtoken)
                                raise
                            nursery.start_soon(self._tcp_query, stream, lock, data,
                                               (per_connection, qtoken), nursery.cancel_scope,
                                               conn)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        log.debug("DNS server: TCP connection ended: %s", e)
                        nursery.cancel_scope.cancel()
        finally:
            self._forget(conn)

    async def _tcp_query(
        self,
        stream: trio.SocketStream,
        lock: trio.Lock,
        data: bytes,
        slot: tuple[trio.CapacityLimiter, object],
        connection: trio.CancelScope,
        conn: _TCPConnection,
    ) -> None:
        per_connection, token = slot
        try:
            self._counters["tcp_queries"] += 1
            checked = self._check(data)
            if checked is None:
                return
            reply = checked if isinstance(checked, bytes) else await self._answer(data)
            if len(reply) > MAX_MESSAGE:
                reply = servfail(data)
            async with lock:
                await stream.send_all(_Framer.frame(reply))
            conn.last_active = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            connection.cancel()  # the client is gone: so is the rest of its connection
        except Exception:
            self._internal_error(data)
        finally:
            self._queries.release_on_behalf_of(token)
            per_connection.release_on_behalf_of(token)

    # -- both --

    def _check(self, data: bytes) -> DNSRecord | bytes | None:
        """The parsed query to answer; an error reply (bytes) to send instead; None: drop it."""
        if len(data) < 12:
            self._counters["dropped_garbage"] += 1
            return None
        flags = struct.unpack_from("!H", data, 2)[0]
        if flags & 0x8000:
            self._counters["dropped_responses"] += 1
            return None
        if (flags >> 11) & 0xF != 0:
            self._counters["notimp"] += 1
            return _with_rcode(servfail(data), RCODE.NOTIMP)
        try:
            rec = DNSRecord.parse(data)
        except Exception:
            rec = None
        if rec is None or len(rec.questions) != 1:
            self._counters["formerr"] += 1
            return _with_rcode(servfail(data), RCODE.FORMERR)
        return rec

    def _internal_error(self, data: bytes) -> None:
        self._counters["internal_errors"] += 1
        log.exception("DNS server: internal error on a %d-byte query; dropped", len(data))

    async def _answer(self, query: bytes) -> bytes:
        try:
            with trio.fail_after(self.answer_timeout):
                return await self.answer(query)
        except trio.TooSlowError:
            self._counters["answer_timeouts"] += 1
            log.warning("DNS server: no answer within %ss; answering SERVFAIL",
                        self.answer_timeout)
        except Exception as e:
            self._counters["answer_errors"] += 1
            log.exception("DNS server: answering failed (%s: %s); answering SERVFAIL",
                          type(e).__name__, e)
        return servfail(query)


# -- the client's resolver -----------------------------------------------------------------------


class _Registration:
    """One call to ``register`` that other queries for the same assignments may wait for."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False


class ClientResolver:
    """The client's ``answer``: non-app queries go upstream unchanged; app queries are
    resolved at a connector, mapped onto magic IPs and answered once the
    connector acknowledged every assignment in the answer (B28).

    Waiting covers more than ``MapResult.new``: an assignment of the answer
    that is not registered with any connector yet (an earlier registration
    failed or is still on its way, for a concurrent query of the same name)
    is waited for too, so no answer names a magic IP whose transit IP the
    connector does not know. On ``ack_timeout`` (or a failed registration)
    the answer is SERVFAIL and counted; the registrar is expected to keep
    what it was given and send it anyway.

    Acknowledged mapped answers are cached (:mod:`conn25.core.dnscache`) for their
    TTL; :meth:`cached` answers a repeated question from there, as long as
    every assignment it names is still the live one and registered.
    """

    def __init__(
        self,
        mapper: DNSMapper,
        forwarder: Forwarder,
        resolve_at_connector: Callable[[App, bytes], Awaitable[bytes]],
        register: Callable[[list[Assignment]], Awaitable[bool]],
        ack_timeout: float = 3.0,
        now: Callable[[], float] = time.time,
        *,
        resolve_timeout: float = 5.0,
        assignments_changed: Callable[[], None] | None = None,
    ) -> None:
        self.mapper = mapper
        self.forwarder = forwarder
        self.resolve_at_connector = resolve_at_connector
        self.register = register
        self.ack_timeout = ack_timeout
        self.resolve_timeout = resolve_timeout
        self._now = now
        self._assignments_changed = assignments_changed or (lambda: None)
        self._pending: dict[IPAddress, _Registration] = {}  # by transit IP
        self._counters = Counter(dict.fromkeys(RESOLVER_COUNTERS, 0))
        self.cache = AnswerCache()

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def reconfigure(self, config: NodeConfig) -> None:
        """Use a reloaded configuration; cached answers may name apps it no longer has."""
        self.mapper.config = config
        self.cache.clear()

    def cached(self, query: bytes) -> bytes | None:
        """The answer to ``query`` from the cache, or None to take :meth:`answer`."""
        key = question_key(query)
        if key is None:
            return None
        hit = self.cache.get(key, query, self._now())
        if hit is None:
            return None
        reply, assignments = hit
        by_magic = self.mapper.assignments.by_magic
        if not all(a.connector is not None and by_magic(a.magic) is a for a in assignments):
            self.cache.drop(key)  # reclaimed or moving to another connector: ask again
            return None
        self._counters["queries"] += 1
        self._counters["app_queries"] += 1
        self._counters["answered_cached"] += 1
        return reply

    async def answer(self, query: bytes) -> bytes:
        cached = self.cached(query)
        if cached is not None:
            return cached
        self._counters["queries"] += 1
        app = self.mapper.app_for_query(query)
        if app is None:
            self._counters["forwarded"] += 1
            return await self.forwarder.forward(query)
        self._counters["app_queries"] += 1
        head = _query_head(query)
        what = self._describe(head, app)
        try:
            with trio.fail_after(self.resolve_timeout):
                resp = await self.resolve_at_connector(app, query)
        except trio.TooSlowError:
            return self._servfail(query, "servfail_connector",
                                  f"{what}: no answer from a connector in {self.resolve_timeout}s")
        except Exception as e:
            return self._servfail(query, "servfail_connector",
                                  f"{what}: connector resolution failed: {type(e).__name__}: {e}")
        # The connector echoes our query; DoH-style channels may zero the id, so only
        # the question must match (a different name would be mapped for the wrong query).
        rhead = _answers(head, _with_id(resp, query)) if len(resp) >= 12 else None
        if rhead is None:
            return self._servfail(query, "servfail_connector",
                                  f"{what}: the connector's answer is not for this question")
        result = self.mapper.map_response(resp, self._now())
        self._counters["assignments_new"] += len(result.new)
        if result.assignments:  # made, or their expiry refreshed: worth persisting
            self._assignments_changed()
        if result.servfail:
            self._counters["servfail_mapping"] += 1
        ok = await self._registered(result.assignments, what)
        if not ok and not result.servfail:
            return servfail(query)
        if result.ours and not result.servfail:
            self._counters["answered_mapped"] += 1
            if (key := question_key(query)) is not None:
                self.cache.put(key, result.wire, result.assignments, self._now())
            log.info("%s: answered %s", what, ", ".join(
                f"{a.magic} (real {a.real}, transit {a.transit})" for a in result.assignments
            ) or "with no address")
        return _with_id(result.wire, query)

    async def _registered(self, assignments: list[Assignment], what: str) -> bool:
        """Register those not registered yet and wait for them and those in flight."""
        mine = [a for a in assignments if a.connector is None and a.transit not in self._pending]
        theirs = {id(r): r for a in assignments
                  if (r := self._pending.get(a.transit)) is not None}
        if not mine and not theirs:
            return True
        timed_out = True
        failed = False
        with trio.move_on_after(self.ack_timeout):
            if mine:
                failed = not await self._register(mine, what)
            for registration in theirs.values():
                await registration.done.wait()
                failed = failed or not registration.ok
            timed_out = False
        if timed_out:
            self._counters["servfail_ack_timeout"] += 1
            log.warning("%s: no acknowledgement from the connector within %ss; answering "
                        "SERVFAIL", what, self.ack_timeout)
            return False
        if failed:
            self._counters["servfail_register"] += 1
            log.warning("%s: the connector did not accept the mappings; answering SERVFAIL",
                        what)
            return False
        return True

    async def _register(self, assignments: list[Assignment], what: str) -> bool:
        registration = _Registration()
        for a in assignments:
            self._pending[a.transit] = registration
        self._counters["registrations"] += 1
        try:
            registration.ok = bool(await self.register(assignments))
        except Exception as e:
            log.warning("%s: registration failed: %s: %s", what, type(e).__name__, e)
        finally:
            # Also on cancellation (ack timeout): whoever waits learns it failed.
            registration.done.set()
            for a in assignments:
                if self._pending.get(a.transit) is registration:
                    del self._pending[a.transit]
        return registration.ok

    def _servfail(self, query: bytes, counter: str, reason: str) -> bytes:
        self._counters[counter] += 1
        log.warning("%s; answering SERVFAIL", reason)
        return servfail(query)

    @staticmethod
    def _describe(head: _Head, app: App) -> str:
        name, qtype, _ = head.questions[0]
        domain = ".".join(p.decode("ascii", "replace") for p in name) + "."
        return f"dns: {domain} {QTYPE.get(qtype)} (app {app.name})"
