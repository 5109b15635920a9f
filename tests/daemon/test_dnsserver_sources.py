"""Who the client's DNS server answers (only this host and --dns-allow networks), and that
idle TCP connections cannot lock other TCP queries out. Real sockets on loopback; 127.0.0.1
plays this host and 127.0.0.2 / 127.0.0.3 other sources (a stand-in for the kernel's answer
to "is this address local?" tells them apart)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from dnslib import RR, A, DNSRecord

from conn25.core.iprange import IPAddress
from conn25.daemon.dns_server import DNSServer, SourcePolicy, kernel_says_local, parse_dns_allow
from conn25.daemon.refusals import RefusalLog
from dnswire import frame, read_frame

LOOP = "127.0.0.1"
HOST_ITSELF = ipaddress.ip_address(LOOP)
OTHER, ALLOWED = "127.0.0.2", "127.0.0.3"


def only_loop_is_local(addr: IPAddress) -> bool:
    return addr == HOST_ITSELF


def query(name: str, qid: int = 0x1234) -> bytes:
    q = DNSRecord.question(name)
    q.header.id = qid
    return bytes(q.pack())


async def answer(wire: bytes) -> bytes:
    q = DNSRecord.parse(wire)
    r = q.reply()
    r.add_answer(RR(q.q.qname, rdata=A("192.0.2.1"), ttl=60))
    return bytes(r.pack())


@asynccontextmanager
async def serving(**kw: object) -> AsyncIterator[tuple[DNSServer, tuple[str, int]]]:
    server = DNSServer((LOOP, 0), answer, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(server.run)
        yield server, addr
        nursery.cancel_scope.cancel()


def policy(*allowed: str) -> SourcePolicy:
    return SourcePolicy(tuple(ipaddress.ip_network(a) for a in allowed),
                        is_local=only_loop_is_local)


# -- the predicate --------------------------------------------------------------------------------


def test_policy_allows_the_host_itself_and_the_allowed_networks_only():
    p = policy(f"{ALLOWED}/32", "2001:db8::/32")
    assert p.allows(HOST_ITSELF)
    assert p.allows(ipaddress.ip_address(ALLOWED))
    assert p.allows(ipaddress.ip_address("2001:db8::5"))
    assert not p.allows(ipaddress.ip_address(OTHER))
    assert not p.allows(ipaddress.ip_address("100.64.0.4"))  # another node's overlay address


def test_policy_asks_once_per_address_within_its_ttl():
    asked: list[IPAddress] = []
    now = [0.0]

    def is_local(addr: IPAddress) -> bool:
        asked.append(addr)
        return False

    p = SourcePolicy(is_local=is_local, ttl=5.0, clock=lambda: now[0])
    a = ipaddress.ip_address("100.64.0.4")
    assert not any(p.allows(a) for _ in range(1000))
    assert asked == [a]
    now[0] = 5.0
    assert not p.allows(a)
    assert asked == [a, a]


def test_policy_decides_on_socket_addresses_once_per_ttl():
    asked: list[IPAddress] = []
    now = [0.0]

    def is_local(addr: IPAddress) -> bool:
        asked.append(addr)
        return addr == HOST_ITSELF

    p = SourcePolicy((ipaddress.ip_network("192.0.2.0/24"),), is_local=is_local,
                     clock=lambda: now[0])
    assert all(p.allows_host(LOOP) for _ in range(100))
    assert p.allows_host("::ffff:127.0.0.1")  # a dual-stack socket's spelling
    assert p.allows_host("192.0.2.9") and not p.allows_host("198.51.100.1")
    assert not p.allows_host("not an address")
    assert asked.count(HOST_ITSELF) == 1  # asked once, whatever the spelling
    now[0] = 6.0
    assert p.allows_host(LOOP)
    assert asked.count(HOST_ITSELF) == 2


def test_the_kernel_knows_its_own_addresses():
    assert kernel_says_local(ipaddress.ip_address("127.0.0.1"))
    assert kernel_says_local(ipaddress.ip_address("127.0.0.9"))  # all of 127/8 is local
    assert not kernel_says_local(ipaddress.ip_address("198.51.100.77"))


def test_dns_allow_option_is_validated_with_clear_errors():
    assert parse_dns_allow("192.0.2.0/24, 2001:db8::/32,198.51.100.7") == (
        ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"))
    with pytest.raises(ValueError, match=r"did you mean 192\.0\.2\.0/24"):
        parse_dns_allow("192.0.2.1/24")
    with pytest.raises(ValueError, match="'nonsense' is not a network"):
        parse_dns_allow("192.0.2.0/24,nonsense")
    with pytest.raises(ValueError, match="network 2 is empty"):
        parse_dns_allow("192.0.2.0/24,")


# -- the server -----------------------------------------------------------------------------------


def udp_socket(source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.setblocking(False)
    return s


def test_udp_queries_from_other_sources_get_no_answer_and_are_counted_and_summarised():
    logger = logging.getLogger("test.dns.refusals")
    refusals = RefusalLog(logger)

    async def main() -> None:
        async with serving(sources=policy(f"{ALLOWED}/32"), refusals=refusals) as (server, addr):
            other, allowed, own = udp_socket(OTHER), udp_socket(ALLOWED), udp_socket(LOOP)
            try:
                for i in range(500):
                    other.sendto(query("x.test", qid=i), addr)
                    if i % 50 == 49:  # let the server drain its socket: none is lost
                        await trio.testing.wait_all_tasks_blocked()
                for s in (allowed, own):
                    s.sendto(query("x.test", qid=7), addr)
                    with trio.fail_after(5):
                        await trio.lowlevel.wait_readable(s)
                    assert DNSRecord.parse(s.recv(65535)).header.id == 7
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(BlockingIOError):
                    other.recv(65535)
                assert server.counters()["refused_source"] == 500
            finally:
                for s in (other, allowed, own):
                    s.close()

    with_lines = []
    handler = logging.Handler()
    handler.emit = with_lines.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trio.run(main)
    finally:
        logger.removeHandler(handler)
    assert refusals.counters["dns_source"] == 500
    assert len(with_lines) == 1 and OTHER in with_lines[0].getMessage()


def test_tcp_connections_from_other_sources_are_closed_unanswered():
    async def main() -> None:
        async with serving(sources=policy()) as (server, addr):
            stream = await trio.open_tcp_stream(*addr, local_address=OTHER)
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(frame(query("x.test")))
                assert await read_frame(stream) is None  # closed, no answer
                raise trio.BrokenResourceError
            own = await trio.open_tcp_stream(*addr)
            await own.send_all(frame(query("x.test", qid=9)))
            got = await read_frame(own)
            assert got is not None and DNSRecord.parse(got).header.id == 9
            assert server.counters()["refused_source"] == 1

    trio.run(main)


def test_200_idle_tcp_connections_do_not_lock_out_a_tcp_query():
    """Every local process shares one source address: a full server evicts the
    longest-idle connection for a new one."""

    async def main() -> None:
        async with serving(sources=policy()) as (server, addr):
            idle = [await trio.open_tcp_stream(*addr) for _ in range(200)]
            with trio.fail_after(5):
                stream = await trio.open_tcp_stream(*addr)
                await stream.send_all(frame(query("x.test", qid=42)))
                got = await read_frame(stream)
            assert got is not None and DNSRecord.parse(got).header.id == 42
            counters = server.counters()
            assert counters["tcp_evicted"] >= 201 - 64
            assert len(server._tcp) <= 64
            # The evicted are the oldest: the first ones are closed, the newest still open.
            with trio.fail_after(5):
                assert await idle[0].receive_some(10) == b""
            for s in [*idle, stream]:
                await s.aclose()

    trio.run(main)


def test_a_connection_with_a_query_in_progress_is_not_evicted():
    release = trio.Event()

    async def slow(wire: bytes) -> bytes:
        if str(DNSRecord.parse(wire).q.qname) == "slow.test.":
            await release.wait()
        return await answer(wire)

    async def main() -> None:
        server = DNSServer((LOOP, 0), slow, max_tcp_connections=2)
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(server.run)
            busy = await trio.open_tcp_stream(*addr)
            await busy.send_all(frame(query("slow.test", qid=1)))
            await trio.testing.wait_all_tasks_blocked()
            idle = await trio.open_tcp_stream(*addr)
            await trio.testing.wait_all_tasks_blocked()
            new = await trio.open_tcp_stream(*addr)  # evicts `idle`, not `busy`
            await new.send_all(frame(query("x.test", qid=2)))
            got = await read_frame(new)
            assert got is not None and DNSRecord.parse(got).header.id == 2
            assert await idle.receive_some(10) == b""
            release.set()
            got = await read_frame(busy)
            assert got is not None and DNSRecord.parse(got).header.id == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_source_that_is_not_local_may_hold_only_its_share_of_connections():
    async def main() -> None:
        async with serving(sources=policy(f"{ALLOWED}/32"), tcp_connections_per_source=3) \
                as (server, addr):
            held = [await trio.open_tcp_stream(*addr, local_address=ALLOWED) for _ in range(3)]
            extra = await trio.open_tcp_stream(*addr, local_address=ALLOWED)
            try:
                await extra.send_all(frame(query("x.test")))
                assert await read_frame(extra) is None
            except trio.BrokenResourceError:
                pass
            assert server.counters()["tcp_refused_per_source"] == 1
            # Local processes are not capped per source (they share one address).
            own = [await trio.open_tcp_stream(*addr) for _ in range(5)]
            await own[-1].send_all(frame(query("x.test", qid=5)))
            got = await read_frame(own[-1])
            assert got is not None and DNSRecord.parse(got).header.id == 5
            for s in [*held, *own]:
                await s.aclose()

    trio.run(main)


