"""The upstream forwarder: non-app queries to the upstream resolvers, over
UDP with TCP fallback on truncation, and where those upstreams come from
(``--upstream-dns``, or the nameservers of resolv.conf).

It is a caching forwarder: answers are kept for their TTL (negative ones as
RFC 2308 says, :class:`conn25.core.dnscache.ForwardCache`, bounded in entries
and bytes), and identical questions asked while one is on its way upstream
wait for that one's answer instead of going upstream again.

Upstream UDP sockets are reused: per upstream a few connected sockets, each
on a port the kernel picked, shared by the queries in flight and replaced
after a number of queries or seconds, so the source port keeps changing.
Every query goes upstream with an id of our own, random and unique on its
socket; since a cached answer is served to everyone, one accepted spoof
would be too many.

It takes a query as :func:`conn25.core.dnsquery.parse` read it and tells an
upstream's answer from a spoofed or stale datagram with
:meth:`conn25.core.dnsquery.Query.answered_by`. May touch: sockets, the trio
clock, the log. Nothing about app domains is decided here.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Container, Iterable

import trio
from dnslib import RCODE

from ..core.dnscache import ForwardCache
from ..core.dnsconfig import nameservers
from ..core.dnsquery import (
    MAX_MESSAGE,
    DNSMapError,
    Query,
    answers,
    parse,
    servfail_to,
    with_id,
)
from ..core.iprange import IPAddress, parse_address, parse_list
from ..core.tailnet import parse_endpoint
from .dns_transport import DNS_PORT, Framer, Upstream, family, send_datagram, show
from .inflight import Coalescer

__all__ = [
    "FORWARDER_COUNTERS",
    "Forwarder",
    "parse_upstreams",
    "upstreams_from_resolv_conf",
]

log = logging.getLogger(__name__)

_RETRY_NEXT = frozenset((RCODE.SERVFAIL, RCODE.NOTIMP, RCODE.REFUSED))  # as glibc's res_send
_MAX_LOGGED_REASONS = 1024
# Upstream UDP sockets: how many per upstream, and how long each serves.
SOCKETS_PER_UPSTREAM = 8
QUERIES_PER_SOCKET = 256
SOCKET_LIFETIME = 30.0  # seconds
_DRAIN = 64  # datagrams a socket's reader takes at once

# Counters, all present from the start (zero) so that metrics keep a stable shape.
FORWARDER_COUNTERS = (
    "upstream_queries", "upstream_answered", "upstream_servfail", "upstream_overload",
    "upstream_timeouts", "upstream_errors", "upstream_refusals", "upstream_mismatched",
    "upstream_tcp_fallbacks", "cache_hits", "coalesced",
)

# -- upstream configuration ----------------------------------------------------------------------


def parse_upstreams(text: str) -> list[Upstream]:
    """The value of ``--upstream-dns ADDR[,ADDR]`` as [(ip, port)], port 53 by default.

    ADDR is ``1.2.3.4``, ``1.2.3.4:5353``, ``2001:db8::1`` or
    ``[2001:db8::1]:53``. ValueError names the bad item.
    """
    return parse_list(text, "--upstream-dns", "address",
                      lambda item: parse_endpoint(item, default_port=DNS_PORT))


def upstreams_from_resolv_conf(
    path: str = "/etc/resolv.conf", exclude: Iterable[str] = (), data: bytes | None = None
) -> list[Upstream]:
    """The ``nameserver`` addresses of a resolv.conf as [(ip, 53)], in file order.

    Addresses in ``exclude`` (the DNS server's own listen address: asking
    ourselves would loop) are left out, as are duplicates and lines that do
    not hold an IP address. A missing file gives no upstreams: then
    non-app queries get SERVFAIL with a logged reason. With ``data``, that is
    the file's content (``path`` only names it in messages): the original that
    ``--accept-dns`` replaced.
    """
    skip = {parse_address(a) for a in exclude}
    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
    out: list[Upstream] = []
    seen: set[IPAddress] = set()
    for number, text in nameservers(data):
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            log.warning("%s:%d: nameserver %r is not an IP address, ignored", path, number,
                        text)
            continue
        # A scoped (link-local) address keeps its %zone for connect(); compare without it.
        bare = ipaddress.ip_address(str(addr).partition("%")[0])
        if bare in skip or addr in seen:
            continue
        seen.add(addr)
        out.append((str(addr), DNS_PORT))
    return out


# -- forwarder -----------------------------------------------------------------------------------


class _UpstreamError(Exception):
    pass


def _own_id(query: Query, taken: Container[int]) -> Query:
    """``query`` as sent upstream: a random id, neither the client's nor one in ``taken``
    (a stub resolver's ids may be guessable; ours must not be)."""
    while (ident := secrets.randbelow(65536)) == query.id or ident in taken:
        pass
    return query._replace(id=ident, wire=ident.to_bytes(2, "big") + query.wire[2:])


def _closed() -> OSError:
    return OSError(errno.EBADF, "the forwarder was closed")


def _restored(data: bytes, head: Query, query: Query) -> tuple[bytes, Query]:
    """An upstream's answer ``data`` (read as ``head``) with the id of the client's ``query``."""
    wire = with_id(data, query.wire)
    return wire, head._replace(id=query.id, wire=wire)


class _Waiter:
    """One query in flight on an :class:`_UdpSocket`."""

    __slots__ = ("answer", "error", "sent", "wake")

    def __init__(self, sent: Query) -> None:
        self.sent = sent  # with our id: what an answer must echo
        self.wake = trio.Event()  # set on its answer, or when it is its turn to read
        self.answer: tuple[bytes, Query] | None = None
        self.error: OSError | None = None


class _UdpSocket:
    """A connected UDP socket to one upstream (only its address can answer), shared by
    the queries in flight there.

    No task of its own: one of the waiting queries at a time reads for all and
    hands each answer to its query by our id, and when it leaves another takes
    over. A socket error fails every query on it and retires it.
    """

    def __init__(self, upstream: Upstream, counters: Counter[str]) -> None:
        raw = socket.socket(family(upstream[0]), socket.SOCK_DGRAM)
        try:
            raw.setblocking(False)
            raw.connect(upstream)  # an address, no name: a route lookup, never blocks
        except OSError:
            raw.close()
            raise
        self._raw = raw
        self.sock = trio.socket.from_stdlib_socket(raw)
        self.born = trio.current_time()
        self.retired = False
        self.pending: dict[int, _Waiter] = {}
        # Every id sent here: a late or repeated answer to one is what a socket of its own
        # would have dropped unseen, not a mismatch. Bounded by QUERIES_PER_SOCKET.
        self.used: set[int] = set()
        self._counters = counters
        self._reading = False
        self._reader: trio.CancelScope | None = None

    def retire(self) -> None:
        """Take no more queries; closed once the ones in flight are done."""
        self.retired = True
        if not self.pending:
            self.sock.close()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def close(self) -> None:
        self.retired = True
        self._fail_all(_closed())
        self.sock.close()

    async def ask(self, query: Query) -> tuple[bytes, Query]:
        """The answer to ``query`` (its id restored); OSError for a socket error."""
        sent = _own_id(query, self.used)
        self.used.add(sent.id)
        waiter = self.pending[sent.id] = _Waiter(sent)
        try:
            try:
                await send_datagram(self._raw, self.sock, sent.wire)
            except (OSError, trio.ClosedResourceError) as e:
                # Often an error an earlier datagram earned (port unreachable): its
                # query's, which a reader will now never see.
                self._broken(e)
            while waiter.answer is None and waiter.error is None:
                if self._reading:
                    waiter.wake = trio.Event()
                    await waiter.wake.wait()
                else:
                    await self._read_for(waiter)
        finally:
            del self.pending[sent.id]
            if self.retired and not self.pending:
                self.sock.close()
            elif not self._reading:
                self._hand_off()
        if waiter.answer is not None:
            return _restored(*waiter.answer, query)
        error = waiter.error
        assert error is not None
        raise OSError(error.errno, error.strerror)  # its own: it may fail several queries

    async def _read_for(self, waiter: _Waiter) -> None:
        self._reading = True
        try:
            while waiter.answer is None and waiter.error is None:
                data = None
                # Cancelled when a send meets the socket's error: the kernel reports it
                # once, and this recv would then wait for nothing.
                with trio.CancelScope() as self._reader:
                    try:
                        data = await self.sock.recv(MAX_MESSAGE)
                    except (OSError, trio.ClosedResourceError) as e:
                        self._broken(e)
                if data is not None:
                    self._deliver(data)
                    self._drain()
        finally:
            self._reading = False
            self._reader = None

    def _drain(self) -> None:
        """What else has arrived, read without a wait (and a task switch) per datagram;
        at most _DRAIN, so that a flood does not keep the reader from yielding."""
        for _ in range(_DRAIN):
            try:
                data = self._raw.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError as e:
                self._broken(e)
                return
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        ident = int.from_bytes(data[:2], "big") if len(data) >= 2 else -1
        waiter = self.pending.get(ident)
        if waiter is None or waiter.answer is not None:
            if ident not in self.used:
                self._counters["upstream_mismatched"] += 1
            return
        head = answers(waiter.sent, data)
        if head is None:
            self._counters["upstream_mismatched"] += 1
            return
        waiter.answer = (data, head)
        waiter.wake.set()

    def _broken(self, error: OSError | trio.ClosedResourceError) -> None:
        """A socket error (port unreachable, say) is the upstream's: every query here fails
        with it, and the socket takes no more."""
        self.retired = True
        self._fail_all(error if isinstance(error, OSError) else _closed())

    def _fail_all(self, error: OSError) -> None:
        for waiter in self.pending.values():
            if waiter.answer is None:
                waiter.error = error
                waiter.wake.set()
        if self._reader is not None:
            self._reader.cancel()

    def _hand_off(self) -> None:
        """Wake a query still waiting, to read for the others now that nobody does."""
        for waiter in self.pending.values():
            if waiter.answer is None and waiter.error is None:
                waiter.wake.set()
                return


class _UdpPool:
    """The UDP sockets to one upstream: at most ``size`` taking queries, each retired after
    ``queries`` queries or ``lifetime`` seconds."""

    def __init__(self, upstream: Upstream, counters: Counter[str], size: int, queries: int,
                 lifetime: float) -> None:
        self.upstream = upstream
        self.live: list[_UdpSocket] = []
        self.retired: list[_UdpSocket] = []  # until their last query is done; for close()
        self._counters = counters
        self._size = size
        self._queries = queries
        self._lifetime = lifetime

    def pick(self) -> _UdpSocket:
        """The socket for the next query: an idle one, else a new one while there are
        fewer than ``size``, else the least busy (more ports in use, more to guess)."""
        now = trio.current_time()
        spent = [s for s in self.live
                 if len(s.used) >= self._queries or now - s.born >= self._lifetime or s.retired]
        if spent:
            for s in spent:
                s.retire()
                self.live.remove(s)
            self.retired = [s for s in (*self.retired, *spent) if not s.closed]
        best = min(self.live, key=_load, default=None)
        if best is None or (best.pending and len(self.live) < self._size):
            best = _UdpSocket(self.upstream, self._counters)
            self.live.append(best)
        return best

    def close(self) -> None:
        for s in (*self.live, *self.retired):
            s.close()
        self.live.clear()
        self.retired.clear()


def _load(s: _UdpSocket) -> int:
    return len(s.pending)


class Forwarder:
    """Sends queries to the upstream resolvers, in order, and returns the first good answer.

    Per upstream: UDP on one of a few reused connected sockets (only the
    upstream's address can answer), with an id of our own; datagrams that do
    not echo that id and the question are ignored until ``timeout``; a
    truncated answer is asked again over TCP (also with an id of our own). A
    timeout, a socket error or a SERVFAIL/NOTIMP/REFUSED answer moves on to
    the next upstream (the last such answer is returned when no upstream
    does better). No upstream, or none answering, gives a
    SERVFAIL built from the query and a log line once per reason.

    At most ``max_inflight`` queries are forwarded at once; more get
    SERVFAIL at once rather than queueing without bound. Answers are cached
    (``cache``) and identical questions in flight share one upstream query.

    :meth:`close` closes its sockets (its owner calls it on the way out); a
    query still in flight then fails over as on a socket error.
    """

    def __init__(
        self, upstreams: list[Upstream], timeout: float = 2.0, *, max_inflight: int = 512,
        cache: ForwardCache | None = None, clock: Callable[[], float] = trio.current_time,
        sockets_per_upstream: int = SOCKETS_PER_UPSTREAM,
        queries_per_socket: int = QUERIES_PER_SOCKET, socket_lifetime: float = SOCKET_LIFETIME,
    ) -> None:
        if not 0 < queries_per_socket < 65536:  # each gets an id of its own on its socket
            raise ValueError(f"queries_per_socket {queries_per_socket}: not in 1..65535")
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.cache = cache if cache is not None else ForwardCache()
        self._clock = clock
        self._limiter = trio.CapacityLimiter(max_inflight)
        self._counters = Counter(dict.fromkeys(FORWARDER_COUNTERS, 0))
        self._logged: dict[Upstream | None, set[str]] = {}
        self._inflight = Coalescer()
        self._pools: dict[Upstream, _UdpPool] = {}
        self._pool_shape = (max(1, sockets_per_upstream), queries_per_socket, socket_lifetime)
        self._closed = False

    def close(self) -> None:
        """Close every upstream socket; later queries fail over as on a socket error."""
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def now(self) -> float:
        """The clock the cache's lifetimes run on."""
        return self._clock()

    def count_cache_hit(self) -> None:
        """A caller answered from ``cache`` itself (the DNS server's fast path)."""
        self._counters["cache_hits"] += 1

    async def forward(self, query: Query | bytes) -> bytes:
        """The upstream answer to ``query`` (as parsed, or its wire form), else SERVFAIL.

        DNSMapError when ``query`` is not a readable DNS query (the caller
        decides how to refuse it).
        """
        if not isinstance(query, Query):
            query = parse(query)
        if query.qr:
            raise DNSMapError("DNS message is a response (QR set), not a query")
        if not query.complete:
            raise DNSMapError("unreadable DNS message: a question cannot be read")
        if (hit := self.cache.get(query, self._clock())) is not None:
            self.count_cache_hit()
            return hit
        answer, shared = await self._inflight.answer(
            query.key, lambda: self._forward_cached(query),
            self.timeout * (len(self.upstreams) + 1))
        if shared:
            self._counters["coalesced"] += 1
        if answer is None:
            return servfail_to(query)
        if shared:  # the cache counts its TTLs down for the later asker
            return self.cache.get(query, self._clock()) or with_id(answer, query.wire)
        return answer

    async def _forward_cached(self, query: Query) -> bytes:
        answer = await self._forward_limited(query)
        if query.key is not None:
            self.cache.put(query, answer, self._clock())
        return answer

    async def _forward_limited(self, query: Query) -> bytes:
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
            return await self._forward(query)
        finally:
            self._limiter.release_on_behalf_of(token)

    async def _forward(self, query: Query) -> bytes:
        fallback: bytes | None = None
        for upstream in list(self.upstreams):
            where = show(upstream)
            try:
                with trio.fail_after(self.timeout):
                    resp, rhead = await self._udp(upstream, query)
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
                        resp, rhead = await self._tcp(upstream, query)
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
                                       f"({', '.join(show(u) for u in self.upstreams)})")

    async def _udp(self, upstream: Upstream, query: Query) -> tuple[bytes, Query]:
        if self._closed:
            raise _closed()
        pool = self._pools.get(upstream)
        if pool is None:
            pool = self._pools[upstream] = _UdpPool(upstream, self._counters, *self._pool_shape)
        return await pool.pick().ask(query)

    async def _tcp(self, upstream: Upstream, query: Query) -> tuple[bytes, Query]:
        sent = _own_id(query, set())
        stream = await trio.open_tcp_stream(*upstream)
        async with stream:
            await stream.send_all(Framer.frame(sent.wire))
            framer = Framer(stream)
            while True:
                data = await framer.receive()
                if data is None:
                    raise _UpstreamError("connection closed before the answer")
                rhead = answers(sent, data)
                if rhead is not None:
                    return _restored(data, rhead, query)
                self._counters["upstream_mismatched"] += 1

    def _fail(self, query: Query, key: Upstream | None, reason: str) -> bytes:
        self._counters["upstream_servfail"] += 1
        self._log_once(key, reason + "; answering SERVFAIL")
        return servfail_to(query)

    def _log_once(self, key: Upstream | None, reason: str) -> None:
        reasons = self._logged.setdefault(key, set())
        if reason in reasons or len(reasons) >= _MAX_LOGGED_REASONS:
            return
        reasons.add(reason)
        log.warning("%s", reason)

