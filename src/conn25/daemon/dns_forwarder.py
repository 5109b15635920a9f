"""The upstream forwarder: non-app queries to the upstream resolvers, over
UDP with TCP fallback on truncation, and where those upstreams come from
(``--upstream-dns``, or the nameservers of resolv.conf).

It is a caching forwarder: answers are kept for their TTL (negative ones as
RFC 2308 says, :class:`conn25.core.dnscache.ForwardCache`, bounded in entries
and bytes), and identical questions asked while one is on its way upstream
wait for that one's answer instead of going upstream again.

It takes a query as :func:`conn25.core.dnsquery.parse` read it and tells an
upstream's answer from a spoofed or stale datagram with
:meth:`conn25.core.dnsquery.Query.answered_by`. May touch: sockets, the trio
clock, the log. Nothing about app domains is decided here.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable

import trio
from dnslib import RCODE

from ..core.dnscache import ForwardCache
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
from .dns_transport import DNS_PORT, Framer, Upstream, family, show
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
    path: str = "/etc/resolv.conf", exclude: Iterable[str] = ()
) -> list[Upstream]:
    """The ``nameserver`` addresses of a resolv.conf as [(ip, 53)], in file order.

    Addresses in ``exclude`` (the DNS server's own listen address: asking
    ourselves would loop) are left out, as are duplicates and lines that do
    not hold an IP address. A missing file gives no upstreams: then
    non-app queries get SERVFAIL with a logged reason.
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
    SERVFAIL at once rather than queueing without bound. Answers are cached
    (``cache``) and identical questions in flight share one upstream query.
    """

    def __init__(
        self, upstreams: list[Upstream], timeout: float = 2.0, *, max_inflight: int = 512,
        cache: ForwardCache | None = None, clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.cache = cache if cache is not None else ForwardCache()
        self._clock = clock
        self._limiter = trio.CapacityLimiter(max_inflight)
        self._counters = Counter(dict.fromkeys(FORWARDER_COUNTERS, 0))
        self._logged: dict[Upstream | None, set[str]] = {}
        self._inflight = Coalescer()

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
        with trio.socket.socket(family(upstream[0]), socket.SOCK_DGRAM) as sock:
            await sock.connect(upstream)
            await sock.send(query.wire)
            while True:
                data = await sock.recv(MAX_MESSAGE)
                rhead = answers(query, data)
                if rhead is not None:
                    return data, rhead
                self._counters["upstream_mismatched"] += 1

    async def _tcp(self, upstream: Upstream, query: Query) -> tuple[bytes, Query]:
        stream = await trio.open_tcp_stream(*upstream)
        async with stream:
            await stream.send_all(Framer.frame(query.wire))
            framer = Framer(stream)
            while True:
                data = await framer.receive()
                if data is None:
                    raise _UpstreamError("connection closed before the answer")
                rhead = answers(query, data)
                if rhead is not None:
                    return data, rhead
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

