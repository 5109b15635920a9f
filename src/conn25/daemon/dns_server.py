"""The DNS server: UDP and TCP listeners in front of an ``answer`` function,
with their limits (queries at once, TCP connections, per-source caps, idle
and answer timeouts) and their source policy (this host and ``--dns-allow``
networks).

It validates what arrives (a datagram that is not a query is dropped or
answered FORMERR/NOTIMP), truncates what a UDP client cannot take, and turns
a failing or slow ``answer`` into SERVFAIL. What the answer is, it does not
know: the node gives it :class:`conn25.daemon.dns_resolver.ClientResolver`'s.
May touch: sockets, netlink (to ask whether a source is local), the trio
clock, the log.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..core.dnsquery import MAX_MESSAGE, UDP_LIMIT, Query, fit_udp, parse, screen, servfail_to
from ..core.iprange import IPAddress, IPNetwork, parse_list
from .dns_transport import Framer, Upstream, family, send_datagram, show
from .refusals import RefusalLog

__all__ = [
    "SERVER_COUNTERS",
    "DNSServer",
    "SourcePolicy",
    "kernel_says_local",
    "parse_dns_allow",
]

log = logging.getLogger(__name__)

_SCREEN_COUNTERS = {"garbage": "dropped_garbage", "response": "dropped_responses",
                    "notimp": "notimp", "formerr": "formerr"}

Answer = Callable[[bytes], Awaitable[bytes]]
Cached = Callable[[bytes], bytes | None]

SERVER_COUNTERS = (
    "udp_queries", "tcp_queries", "tcp_connections", "tcp_idle_closed", "truncated",
    "formerr", "notimp", "dropped_garbage", "dropped_responses", "dropped_busy",
    "answer_timeouts", "answer_errors", "internal_errors",
    "refused_source", "tcp_evicted", "tcp_refused_per_source", "tcp_refused_busy",
)

def parse_dns_allow(text: str) -> tuple[IPNetwork, ...]:
    """The value of ``--dns-allow CIDR[,CIDR]``; ValueError names the bad item."""
    def network(item: str) -> IPNetwork:
        try:
            return ipaddress.ip_network(item)
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not a network (CIDR such as 192.0.2.0/24 or "
                                 "2001:db8::/32, or one address)") from None
            raise ValueError(f"{item!r} has host bits set; did you mean {loose}?") from None

    return tuple(parse_list(text, "--dns-allow", "network", network))


def kernel_says_local(addr: IPAddress) -> bool:
    """Whether the kernel delivers ``addr`` locally (its route is of type RTN_LOCAL).

    The kernel's own answer covers every address of every interface, 127/8
    included, and addresses added later, with nothing to keep in sync.
    """
    from .netlink import IPRoute  # netlink; imported here so the module loads without it

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
        max_queries: int = 4096,
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
        self._raw_udp: socket.socket | None = None  # the UDP socket, once bound

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
                assert self.address is not None  # _bind set it
                log.info("DNS server listening on %s (UDP and TCP)", show(self.address))
                task_status.started(self.address)
        finally:
            udp.close()
            tcp.close()

    async def _bind(self) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
        host, port = self.listen
        fam = family(host)
        # Port 0 picks a free UDP port; the TCP side may find that port taken: try another.
        for _ in range(1 if port else 20):
            # The stdlib socket too: the receive loop drains it without a checkpoint each.
            raw = socket.socket(fam, socket.SOCK_DGRAM)
            udp = trio.socket.from_stdlib_socket(raw)
            tcp = trio.socket.socket(fam, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _receive_buffer(udp)
                await udp.bind((host, port))
                bound = udp.getsockname()[1]
                await tcp.bind((host, bound))
                tcp.listen(128)
            except OSError as e:
                udp.close()
                tcp.close()
                if port or e.errno != 98:  # EADDRINUSE
                    raise OSError(e.errno, f"DNS server cannot listen on {show(self.listen)}: "
                                           f"{e.strerror}") from None
                continue
            self.address = (host, bound)
            self._raw_udp = raw
            return udp, tcp
        raise OSError(98, f"DNS server found no port free for both UDP and TCP on {host}")

    # -- UDP --

    async def _serve_udp(self, sock: trio.socket.SocketType) -> None:
        raw = self._raw_udp
        assert raw is not None  # bound
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(raw)
                # What is waiting, up to a batch, before others get a turn: a burst of
                # queries then costs a scheduler round per batch, not per datagram.
                for _ in range(UDP_BATCH):
                    try:
                        data, client = raw.recvfrom(MAX_MESSAGE)
                    except BlockingIOError:
                        break
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
                await trio.lowlevel.checkpoint()

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
            await self._sendto(sock, reply, client)
        except OSError as e:
            log.debug("DNS server: cannot answer %s over UDP: %s", client, e)
        return True

    async def _sendto(self, sock: trio.socket.SocketType, reply: bytes, client: Any) -> None:
        assert self._raw_udp is not None
        await send_datagram(self._raw_udp, sock, reply, client)

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
            await self._sendto(sock, reply, client)
        except OSError as e:
            log.debug("DNS server: cannot answer %s over UDP: %s", client, e)
        except Exception:
            self._internal_error(data)
        finally:
            self._queries.release_on_behalf_of(token)

    def _fit(self, query: Query, reply: bytes) -> bytes:
        """``reply`` if the UDP client takes it, else a truncated answer with TC set."""
        truncated = fit_udp(query, reply)
        if truncated is None:
            return reply
        self._counters["truncated"] += 1
        return truncated

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
                    framer = Framer(stream)
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
                reply = servfail_to(parse(data))
            async with lock:
                await stream.send_all(Framer.frame(reply))
            conn.last_active = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            connection.cancel()  # the client is gone: so is the rest of its connection
        except Exception:
            self._internal_error(data)
        finally:
            self._queries.release_on_behalf_of(token)
            per_connection.release_on_behalf_of(token)

    # -- both --

    def _check(self, data: bytes) -> Query | bytes | None:
        """The parsed query to answer; an error reply (bytes) to send instead; None: drop it."""
        verdict, out = screen(data)
        if verdict != "query":
            self._counters[_SCREEN_COUNTERS[verdict]] += 1
        return out

    def _internal_error(self, data: bytes) -> None:
        self._counters["internal_errors"] += 1
        log.exception("DNS server: internal error on a %d-byte query; dropped", len(data))

    async def _answer(self, query: bytes) -> bytes:
        try:
            # A plain scope, not fail_after's generator around one: every query pays it.
            with trio.CancelScope(relative_deadline=self.answer_timeout):
                return await self.answer(query)
            self._counters["answer_timeouts"] += 1
            log.warning("DNS server: no answer within %ss; answering SERVFAIL",
                        self.answer_timeout)
        except Exception as e:
            self._counters["answer_errors"] += 1
            log.exception("DNS server: answering failed (%s: %s); answering SERVFAIL",
                          type(e).__name__, e)
        return servfail_to(parse(query))


# Room for a burst of queries (a browser starting up asks thousands at once): the
# default buffer holds a few hundred small datagrams, and what does not fit is lost
# before the server sees it, costing the asker a retry seconds later.
UDP_RECEIVE_BUFFER = 4 << 20
UDP_BATCH = 64  # datagrams read in one turn of the receive loop
_SO_RCVBUFFORCE = 33  # Linux's; Python's socket module does not name it


def _receive_buffer(sock: trio.socket.SocketType) -> None:
    try:  # beyond net.core.rmem_max, which root may exceed
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
