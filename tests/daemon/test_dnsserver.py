"""The DNS shell: upstream forwarding (UDP, TCP fallback, failover), the UDP+TCP
server, and the client's resolver that answers app queries only after the
connector acknowledged the mappings. Non-app names pass byte for byte.

A real upstream is dnsmasq on loopback; small trio fakes play the upstreams
that misbehave (truncation, wrong ids, silence).
"""

import errno
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from conn25.core import peerapi
from conn25.core.assignments import Assignments
from conn25.core.config import App, Member, NodeConfig, Pools, Tailnet
from conn25.core.dnscache import ForwardCache
from conn25.core.dnsmap import DNSMapError, DNSMapper, answer_addresses
from conn25.core.dnsquery import Query, parse, servfail_to
from conn25.core.iprange import IPRange, IPSet
from conn25.core.peerapi import Code, MappedTransitIP, ResolveAnswer
from conn25.daemon import dns_resolver
from conn25.daemon.dns_forwarder import Forwarder, parse_upstreams, upstreams_from_resolv_conf
from conn25.daemon.dns_resolver import DEFAULT_OFFERS, ClientResolver
from conn25.daemon.dns_server import DNSServer
from dnswire import frame, read_frame
from nodekeys import public_key

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
LOOP = "127.0.0.1"
APP = App("App", ("app.test.", "*.app.test."), ("tag:app-connector",))
BIG = [f"198.51.100.{i}" for i in range(1, 41)]  # 40 A records: over 512 bytes
MULTI = ["203.0.113.21", "203.0.113.22", "203.0.113.23"]


def ip(s):
    return ipaddress.ip_address(s)


def query(name, qtype="A", qid=0x1234, edns=None):
    q = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return q.pack()


def reply(wire, *records, tc=False, rcode=0, qid=None, name=None):
    """A response to ``wire`` (optionally for another id or name) with ``records``."""
    q = DNSRecord.parse(wire)
    r = q.reply()
    if qid is not None:
        r.header.id = qid
    if name is not None:
        r.questions = [DNSQuestion(name, q.q.qtype)]
    r.header.tc = int(tc)
    r.header.rcode = rcode
    for rr in records:
        r.add_answer(rr)
    return r.pack()


def a_records(name, addrs, ttl=300):
    return [RR(name, QTYPE.A, rdata=A(x), ttl=ttl) for x in addrs]


def addresses(wire):
    return [repr(rr.rdata) for rr in DNSRecord.parse(wire).rr if rr.rtype in (1, 28)]


# -- a real upstream: dnsmasq ----------------------------------------------------------------------


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOP, 0))
        return s.getsockname()[1]


def _dnsmasq_ready(proc, port, deadline):
    probe = query("plain.test", qid=7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False  # exited: most likely the port was taken
            s.sendto(probe, (LOOP, port))
            try:
                if s.recv(4096)[:2] == probe[:2]:
                    return True
            except (TimeoutError, ConnectionRefusedError):
                continue
    return False


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    """(ip, port) of a dnsmasq answering from the command line only."""
    if not os.access(DNSMASQ, os.X_OK):
        pytest.skip("dnsmasq is not installed")
    pidfile = tmp_path_factory.mktemp("dnsmasq") / "pid"
    records = [
        "--address=/plain.test/198.51.100.200",
        "--address=/nx.test/",  # NXDOMAIN
        "--host-record=app.test,203.0.113.5,2001:db8::5",
        "--host-record=edge.app-cdn.test,203.0.113.10",
        "--cname=www.app.test,edge.app-cdn.test",
        *(f"--host-record=big.test,{a}" for a in BIG),
        *(f"--host-record=multi.app.test,{a}" for a in MULTI),
    ]
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [DNSMASQ, "--no-resolv", "--no-hosts", "--keep-in-foreground",
             "--conf-file=/dev/null", f"--pid-file={pidfile}", f"--port={port}",
             f"--listen-address={LOOP}", "--bind-interfaces", "--local-ttl=300", *records],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if _dnsmasq_ready(proc, port, time.monotonic() + 5):
            break
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        pytest.fail("dnsmasq did not start")
    try:
        yield (LOOP, port)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def ask_udp_sync(addr, wire):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(wire, addr)
        return s.recv(65535)


# -- trio helpers ----------------------------------------------------------------------------------


async def ask_udp(addr, wire, timeout=2.0):
    """The first datagram back, or None when nothing came within ``timeout``."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.sendto(wire, addr)
        with trio.move_on_after(timeout):
            return await s.recv(65535)
    return None


@asynccontextmanager
async def fake_upstream(on_udp=None, on_tcp=None, peers=None):
    """A loopback upstream: ``on_udp(query) -> [datagrams]``, ``on_tcp(query) -> reply``.

    Without ``on_udp`` it receives and never answers; without ``on_tcp`` no TCP.
    Into ``peers``, when given, the (ip, port) each UDP query came from, before
    ``on_udp`` sees it; a datagram ``on_udp`` gives as (datagram, peer) goes there.
    """
    # TCP listens on the UDP socket's port number, which a TCP socket of some other test or
    # process may already hold: then take another UDP port rather than fail.
    for _ in range(20):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((LOOP, 0))
        port = sock.getsockname()[1]
        try:
            listeners = await trio.open_tcp_listeners(port, host=LOOP) if on_tcp else []
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        break
    else:
        raise RuntimeError("fake_upstream: no port free for both UDP and TCP in 20 tries")
    seen = []

    async def serve_udp():
        while True:
            data, peer = await sock.recvfrom(65535)
            seen.append(("udp", data))
            if peers is not None:
                peers.append(peer)
            for out in (on_udp(data) if on_udp else []):
                out, to = out if isinstance(out, tuple) else (out, peer)
                await sock.sendto(out, to)

    async def serve_tcp(stream):
        async with stream:
            data = await read_frame(stream)
            seen.append(("tcp", data))
            await stream.send_all(frame(on_tcp(data)))

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_udp)
            if listeners:
                nursery.start_soon(trio.serve_listeners, serve_tcp, listeners)
            yield (LOOP, port), seen
            nursery.cancel_scope.cancel()


def closed_port():
    """A loopback UDP port with nobody listening (the kernel answers port unreachable)."""
    return (LOOP, _free_port())


def run(fn, *args):
    return trio.run(fn, *args)


# -- upstream configuration ------------------------------------------------------------


def test_resolv_conf_nameservers_in_order_without_the_listen_address(tmp_path):
    """Default upstreams are resolv.conf's nameservers other than the listen address."""
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated\n"
        "search example.org\n"
        "nameserver 100.100.100.100\n"
        "  nameserver 192.0.2.53   # trailing comment\n"
        "; nameserver 192.0.2.99\n"
        "nameserver 2001:db8::53\n"
        "nameserver 192.0.2.53\n"
        "nameserver\n"
        "nameserver dns.example.org\n"
        "options edns0\n"
    )
    assert upstreams_from_resolv_conf(str(path), exclude=["100.100.100.100"]) == [
        ("192.0.2.53", 53), ("2001:db8::53", 53)]


def test_resolv_conf_with_only_the_listen_address_gives_no_upstream(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 100.100.100.100\n")
    assert upstreams_from_resolv_conf(str(path), exclude=["100.100.100.100"]) == []
    assert upstreams_from_resolv_conf(str(tmp_path / "missing")) == []


def test_resolv_conf_excludes_v6_listen_address_in_any_spelling(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver fd7a:115c:a1e0:0::53\nnameserver 192.0.2.1\n")
    assert upstreams_from_resolv_conf(str(path), exclude=["fd7a:115c:a1e0::53"]) == [
        ("192.0.2.1", 53)]


def test_resolv_conf_bad_exclude_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'nope' is not an IP address"):
        upstreams_from_resolv_conf(str(tmp_path / "x"), exclude=["nope"])


def test_upstream_dns_flag_parses_addresses_with_and_without_ports():
    assert parse_upstreams("192.0.2.1") == [("192.0.2.1", 53)]
    assert parse_upstreams("192.0.2.1:5353, [2001:db8::1]:53,2001:db8::2") == [
        ("192.0.2.1", 5353), ("2001:db8::1", 53), ("2001:db8::2", 53)]


@pytest.mark.parametrize(("text", "message"), [
    ("", "address 1 is empty"),
    ("192.0.2.1,", "address 2 is empty"),
    ("dns.example.org", "not an IP address"),
    ("192.0.2.1:0", "bad port"),
    ("192.0.2.1:99999", "bad port"),
    ("192.0.2.1:", "empty port"),
    ("[2001:db8::1", "is not \"ip:port\""),
])
def test_upstream_dns_flag_rejects_bad_addresses_naming_them(text, message):
    with pytest.raises(ValueError, match="--upstream-dns") as e:
        parse_upstreams(text)
    assert message in str(e.value)


# -- forwarder -------------------------------------------------------------------------------------


def test_forwarder_returns_the_upstream_answer_unchanged(dnsmasq):
    """Non-app answers pass byte for byte."""
    q = query("plain.test", qid=0x4242)
    direct = ask_udp_sync(dnsmasq, q)

    async def main():
        fwd = Forwarder([dnsmasq])
        out = await fwd.forward(q)
        return out, fwd.counters()

    out, counters = run(main)
    assert out == direct
    assert addresses(out) == ["198.51.100.200"]
    assert counters["upstream_answered"] == 1 and counters["upstream_servfail"] == 0


def test_forwarder_retries_a_truncated_answer_over_tcp_at_dnsmasq(dnsmasq):
    """UDP, with TCP fallback on truncation (dnsmasq truncates 40 A records)."""
    async def main():
        fwd = Forwarder([dnsmasq])
        return await fwd.forward(query("big.test")), fwd.counters()

    out, counters = run(main)
    rec = DNSRecord.parse(out)
    assert rec.header.tc == 0 and rec.header.id == 0x1234
    assert sorted(addresses(out)) == sorted(BIG)
    assert counters["upstream_tcp_fallbacks"] == 1


def test_forwarder_uses_tcp_answer_after_truncated_udp():
    async def main():
        async with fake_upstream(
            on_udp=lambda q: [reply(q, tc=True)],
            on_tcp=lambda q: reply(q, *a_records("x.test", ["192.0.2.99"])),
        ) as (addr, seen):
            fwd = Forwarder([addr])
            out = await fwd.forward(query("x.test"))
            return out, [kind for kind, _ in seen], fwd.counters()

    out, kinds, counters = run(main)
    assert addresses(out) == ["192.0.2.99"] and DNSRecord.parse(out).header.tc == 0
    assert kinds == ["udp", "tcp"]
    assert counters["upstream_tcp_fallbacks"] == 1


def test_forwarder_keeps_truncated_answer_when_tcp_fails():
    """The client can still retry over TCP; better than SERVFAIL."""
    async def main():
        async with fake_upstream(on_udp=lambda q: [reply(q, tc=True)]) as (addr, _):
            return await Forwarder([addr], timeout=0.5).forward(query("x.test"))

    out = run(main)
    rec = DNSRecord.parse(out)
    assert rec.header.tc == 1 and rec.header.rcode == RCODE.NOERROR


def test_forwarder_ignores_datagrams_with_wrong_id_or_question():
    """Spoofed or stale answers are skipped until the real one arrives."""
    def answers(q):
        return [
            reply(q, *a_records("x.test", ["192.0.2.66"]), qid=0x9999),
            reply(q, *a_records("evil.test", ["192.0.2.66"]), name="evil.test"),
            b"\x12\x34garbage",
            reply(q, *a_records("x.test", ["192.0.2.1"])),
        ]

    async def main():
        async with fake_upstream(on_udp=answers) as (addr, _):
            fwd = Forwarder([addr])
            return await fwd.forward(query("x.test")), fwd.counters()

    out, counters = run(main)
    assert addresses(out) == ["192.0.2.1"] and DNSRecord.parse(out).header.id == 0x1234
    assert counters["upstream_mismatched"] == 3


def test_forwarder_accepts_an_answer_whose_question_differs_only_in_case():
    async def main():
        async with fake_upstream(
            on_udp=lambda q: [reply(q, *a_records("x.test", ["192.0.2.1"]), name="X.TEST")],
        ) as (addr, _):
            return await Forwarder([addr]).forward(query("x.test"))

    assert addresses(run(main)) == ["192.0.2.1"]


def test_forwarder_moves_on_from_a_silent_upstream_after_the_timeout(dnsmasq):
    async def main():
        async with fake_upstream() as (silent, seen):
            fwd = Forwarder([silent, dnsmasq], timeout=0.2)
            t0 = trio.current_time()
            out = await fwd.forward(query("plain.test"))
            return out, trio.current_time() - t0, len(seen), fwd.counters()

    out, elapsed, asked, counters = run(main)
    assert addresses(out) == ["198.51.100.200"]
    assert asked == 1 and 0.2 <= elapsed < 2
    assert counters["upstream_timeouts"] == 1 and counters["upstream_answered"] == 1


def test_forwarder_moves_on_at_once_from_a_closed_port(dnsmasq):
    async def main():
        fwd = Forwarder([closed_port(), dnsmasq], timeout=5)
        t0 = trio.current_time()
        out = await fwd.forward(query("plain.test"))
        return out, trio.current_time() - t0, fwd.counters()

    out, elapsed, counters = run(main)
    assert addresses(out) == ["198.51.100.200"]
    assert elapsed < 2 and counters["upstream_errors"] == 1


def test_forwarder_tries_next_upstream_on_refused_and_keeps_it_as_last_resort():
    async def main():
        async with fake_upstream(on_udp=lambda q: [reply(q, rcode=RCODE.REFUSED)]) as (r, _), \
                fake_upstream(on_udp=lambda q: [reply(q, *a_records("x.test", ["192.0.2.2"]))]
                              ) as (good, _):
            first = await Forwarder([r, good]).forward(query("x.test"))
            only = await Forwarder([r]).forward(query("x.test"))
            return first, only

    first, only = run(main)
    assert addresses(first) == ["192.0.2.2"]
    assert DNSRecord.parse(only).header.rcode == RCODE.REFUSED


def test_forwarder_passes_nxdomain_without_trying_further(dnsmasq):
    async def main():
        async with fake_upstream() as (silent, seen):
            out = await Forwarder([dnsmasq, silent], timeout=0.2).forward(query("nx.test"))
            return out, seen

    out, seen = run(main)
    assert DNSRecord.parse(out).header.rcode == RCODE.NXDOMAIN and seen == []


def test_no_upstream_gives_servfail_and_logs_the_reason_once(caplog):
    """With no upstream left, non-app queries get SERVFAIL and a logged reason."""
    async def main():
        fwd = Forwarder([])
        return [await fwd.forward(query("x.test", qid=i)) for i in (1, 2, 3)], fwd.counters()

    with caplog.at_level(logging.WARNING, logger="conn25.daemon.dns_forwarder"):
        outs, counters = run(main)
    for qid, out in zip((1, 2, 3), outs, strict=True):
        rec = DNSRecord.parse(out)
        assert rec.header.id == qid and rec.header.rcode == RCODE.SERVFAIL
        assert str(rec.q.qname) == "x.test."
    reasons = [r.getMessage() for r in caplog.records if "no upstream" in r.getMessage()]
    assert len(reasons) == 1 and "--upstream-dns" in reasons[0]
    assert counters["upstream_servfail"] == 3


def test_all_upstreams_silent_gives_servfail_logged_once(caplog):
    async def main():
        async with fake_upstream() as (a, _), fake_upstream() as (b, _):
            fwd = Forwarder([a, b], timeout=0.1)
            return [await fwd.forward(query("x.test")) for _ in range(2)]

    with caplog.at_level(logging.WARNING, logger="conn25.daemon.dns_forwarder"):
        outs = run(main)
    assert all(DNSRecord.parse(o).header.rcode == RCODE.SERVFAIL for o in outs)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no DNS upstream answered" in m for m in messages) == 1
    assert sum("no answer within" in m for m in messages) == 2  # once per upstream


def test_forwarder_caps_queries_in_flight():
    async def main():
        async with fake_upstream() as (silent, _):
            fwd = Forwarder([silent], timeout=1, max_inflight=1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fwd.forward, query("x.test", qid=1))
                await trio.testing.wait_all_tasks_blocked()
                # Another question (the same one would wait for the first's answer).
                second = await fwd.forward(query("y.test", qid=2))
                nursery.cancel_scope.cancel()
            return second, fwd.counters()

    second, counters = run(main)
    rec = DNSRecord.parse(second)
    assert rec.header.rcode == RCODE.SERVFAIL and rec.header.id == 2
    assert counters["upstream_overload"] == 1


def test_the_same_question_in_flight_goes_upstream_once_and_answers_all():
    answered = trio.Event()

    def on_udp(data):
        return [reply(data, RR("x.test", rdata=A("198.51.100.7"), ttl=300))]

    async def main():
        async with fake_upstream(on_udp) as (upstream, seen):
            fwd = Forwarder([upstream], timeout=2)
            results = {}

            async def ask(qid):
                results[qid] = await fwd.forward(query("x.test", qid=qid))
                if len(results) == 3:
                    answered.set()

            async with trio.open_nursery() as nursery:
                for qid in (1, 2, 3):
                    nursery.start_soon(ask, qid)
                with trio.fail_after(5):
                    await answered.wait()
            return results, seen, fwd.counters()

    results, seen, counters = run(main)
    assert len(seen) == 1  # one upstream query for three askers
    for qid, wire in results.items():
        rec = DNSRecord.parse(wire)
        assert rec.header.id == qid and str(rec.a.rdata) == "198.51.100.7"
    assert (counters["upstream_queries"], counters["coalesced"]) == (1, 2)


def test_answers_are_cached_for_their_ttl_counted_down():
    now = [1000.0]

    def on_udp(data):
        return [reply(data, RR("x.test", rdata=A("198.51.100.7"), ttl=60))]

    async def main():
        async with fake_upstream(on_udp) as (upstream, seen):
            fwd = Forwarder([upstream], timeout=2, clock=lambda: now[0])
            first = await fwd.forward(query("x.test", qid=1))
            now[0] += 25
            second = await fwd.forward(query("x.test", qid=2))
            third = await fwd.forward(query("X.test", qid=3))  # another case: its own entry
            now[0] += 60  # expired: upstream again
            fourth = await fwd.forward(query("x.test", qid=4))
            return [first, second, third, fourth], len(seen), fwd.counters()

    answers, upstream_queries, counters = run(main)
    recs = [DNSRecord.parse(a) for a in answers]
    assert [r.header.id for r in recs] == [1, 2, 3, 4]
    assert [r.a.ttl for r in recs] == [60, 35, 60, 60]
    assert upstream_queries == 3 and counters["cache_hits"] == 1


def answer_by_name(data):
    """A fake upstream's answer: 192.0.2.N for the name nN.test."""
    name = str(DNSRecord.parse(data).q.qname)
    return reply(data, *a_records(name, [f"192.0.2.{int(name[1:].split('.')[0])}"]))


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_upstream_sockets_are_reused_and_retired_after_their_query_limit():
    """Sequential queries share a socket (one source port) until its query limit."""
    async def main():
        ports = {}
        for limit in (256, 4):
            peers = []
            async with fake_upstream(lambda q: [answer_by_name(q)], peers=peers) as (addr, _):
                fwd = Forwarder([addr], queries_per_socket=limit)
                outs = [await fwd.forward(query(f"n{i}.test")) for i in range(10)]
                fwd.close()
            assert [addresses(o) for o in outs] == [[f"192.0.2.{i}"] for i in range(10)]
            ports[limit] = [port for _, port in peers]
        return ports

    ports = run(main)
    assert len(set(ports[256])) == 1
    by_four = ports[4]  # 4, 4 and 2 queries, each socket on a port of its own
    assert [len(set(by_four[i:i + 4])) for i in (0, 4, 8)] == [1, 1, 1]
    assert len(set(by_four)) > 1


def test_upstream_sockets_are_retired_after_their_lifetime():
    clock = trio.testing.MockClock()

    async def main():
        peers = []
        async with fake_upstream(lambda q: [answer_by_name(q)], peers=peers) as (addr, _):
            fwd = Forwarder([addr], socket_lifetime=30)
            await fwd.forward(query("n1.test"))
            clock.jump(29)
            await fwd.forward(query("n2.test"))
            clock.jump(2)
            await fwd.forward(query("n3.test"))
            fwd.close()
        return [port for _, port in peers]

    first, second, third = trio.run(main, clock=clock)
    assert first == second != third


def test_ids_sent_upstream_are_random_and_the_client_gets_its_own_back():
    """Over UDP and TCP the upstream sees ids of the forwarder's, not the client's."""
    def on_udp(data):
        if str(DNSRecord.parse(data).q.qname) == "big.test.":
            return [reply(data, tc=True)]
        return [answer_by_name(data)]

    async def main():
        async with fake_upstream(on_udp, on_tcp=lambda q: reply(
                q, *a_records("big.test", BIG))) as (addr, seen):
            fwd = Forwarder([addr])
            outs = [await fwd.forward(query(f"n{i}.test", qid=0x1234)) for i in range(20)]
            big = await fwd.forward(query("big.test", qid=0x1234))
            fwd.close()
        return outs, big, seen

    outs, big, seen = run(main)
    assert all(DNSRecord.parse(o).header.id == 0x1234 for o in [*outs, big])
    assert [addresses(o) for o in outs] == [[f"192.0.2.{i}"] for i in range(20)]
    assert sorted(addresses(big)) == sorted(BIG)
    ids = [int.from_bytes(data[:2], "big") for kind, data in seen if kind == "udp"][:20]
    assert 0x1234 not in ids and len(set(ids)) == 20  # unique on their socket
    assert len({b - a for a, b in itertools.pairwise(ids)}) > 1  # not a counter
    assert [kind for kind, _ in seen[-2:]] == ["udp", "tcp"]
    assert int.from_bytes(seen[-1][1][:2], "big") != 0x1234


def test_an_answer_with_the_clients_id_or_another_question_is_not_accepted():
    """Only our id and the question asked make an answer: else SERVFAIL after the timeout."""
    def on_udp(data):
        return [reply(data, *a_records("x.test", ["192.0.2.66"]), qid=0x1234),
                reply(data, *a_records("evil.test", ["192.0.2.66"]), name="evil.test")]

    async def main():
        async with fake_upstream(on_udp) as (addr, _):
            fwd = Forwarder([addr], timeout=0.3)
            out = await fwd.forward(query("x.test", qid=0x1234))
            fwd.close()
            return out, fwd.counters()

    out, counters = run(main)
    rec = DNSRecord.parse(out)
    assert rec.header.rcode == RCODE.SERVFAIL and rec.header.id == 0x1234 and not rec.rr
    assert counters["upstream_mismatched"] == 2 and counters["upstream_timeouts"] == 1


@pytest.mark.parametrize("sockets", [1, 8])
def test_concurrent_queries_with_the_same_client_id_each_get_their_own_answer(sockets):
    """Answered in reverse order, on shared sockets: each answer still finds its query."""
    held, peers = [], []

    def on_udp(data):
        held.append((data, peers[-1]))
        return [(answer_by_name(d), p) for d, p in reversed(held)] if len(held) == 20 else []

    async def main():
        async with fake_upstream(on_udp, peers=peers) as (addr, _):
            fwd = Forwarder([addr], sockets_per_upstream=sockets)
            outs = {}

            async def ask(i):
                outs[i] = await fwd.forward(query(f"n{i}.test", qid=7))

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(ask, i)
            fwd.close()
            return outs, fwd.counters()

    outs, counters = run(main)
    for i, out in outs.items():
        assert DNSRecord.parse(out).header.id == 7 and addresses(out) == [f"192.0.2.{i}"]
    assert len(outs) == 20 and counters["upstream_mismatched"] == 0
    assert len(set(peers)) == sockets


def test_a_closed_port_fails_every_query_sharing_its_socket_at_once(dnsmasq):
    async def main():
        fwd = Forwarder([closed_port(), dnsmasq], timeout=5, sockets_per_upstream=1)
        outs = {}

        async def ask(name):
            outs[name] = await fwd.forward(query(name))

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for name in ("plain.test", "nx.test"):
                nursery.start_soon(ask, name)
        fwd.close()
        return [outs["plain.test"], outs["nx.test"]], trio.current_time() - t0, fwd.counters()

    outs, elapsed, counters = run(main)
    assert [DNSRecord.parse(o).header.rcode for o in outs] == [RCODE.NOERROR, RCODE.NXDOMAIN]
    assert elapsed < 2 and counters["upstream_errors"] == 2


def test_closing_the_forwarder_closes_every_socket_and_fails_what_is_in_flight():
    async def main():
        async with fake_upstream(lambda q: [answer_by_name(q)]) as (addr, _), \
                fake_upstream() as (silent, _):
            before = open_fds()
            fwd = Forwarder([silent, addr], timeout=5)
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(fwd.forward, query(f"n{i}.test"))
                await trio.testing.wait_all_tasks_blocked()
                held = open_fds() - before  # five on the silent one, none on addr yet
                t0 = trio.current_time()
                fwd.close()  # the five fail over to addr, which has no socket any more
            elapsed = trio.current_time() - t0
            after = open_fds() - before
            return held, elapsed, after, fwd.counters()

    held, elapsed, after, counters = run(main)
    assert held == 5 and after == 0 and elapsed < 1
    assert counters["upstream_errors"] == 10 and counters["upstream_servfail"] == 5


def test_forwarder_refuses_what_is_not_a_query():
    async def main(wire):
        return await Forwarder([closed_port()]).forward(wire)

    with pytest.raises(DNSMapError, match="unreadable"):
        run(main, b"\x00\x01")
    with pytest.raises(DNSMapError, match="QR set"):
        run(main, reply(query("x.test")))


# -- server ----------------------------------------------------------------------------------------


async def big_answer(wire):
    """``answer`` for the server tests: BIG for big.test, one record otherwise."""
    q = DNSRecord.parse(wire)
    name = str(q.q.qname)
    if name == "boom.test.":
        raise RuntimeError("boom")
    if name == "hang.test.":
        await trio.sleep_forever()
    addrs = BIG if name == "big.test." else ["192.0.2.1"]
    return reply(wire, *a_records(name, addrs))


@asynccontextmanager
async def serving(answer=big_answer, **kw):
    server = DNSServer((LOOP, 0), answer, **kw)
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(server.run)
        yield server, addr
        nursery.cancel_scope.cancel()


def test_server_answers_over_udp_with_the_query_id():
    async def main():
        async with serving() as (server, addr):
            return await ask_udp(addr, query("x.test", qid=0xBEEF)), server.counters()

    out, counters = run(main)
    assert DNSRecord.parse(out).header.id == 0xBEEF and addresses(out) == ["192.0.2.1"]
    assert counters["udp_queries"] == 1


def test_server_takes_a_burst_of_two_thousand_queries_sent_at_once_without_losing_one():
    """A browser starting up asks thousands of names at once: its datagrams must fit in
    the server's receive buffer and all be answered (none dropped for being busy)."""
    gate = trio.Event()

    async def slow_answer(wire):
        await gate.wait()  # nothing is answered until every query was sent
        return await big_answer(wire)

    async def main():
        async with serving(slow_answer) as (server, addr):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                await sock.connect(addr)
                for i in range(2000):
                    await sock.send(query(f"n{i}.test", qid=i))
                with trio.fail_after(10):
                    while server.counters()["udp_queries"] < 2000:
                        await trio.sleep(0.01)
                    gate.set()
                    ids = set()
                    while len(ids) < 2000:
                        ids.add(DNSRecord.parse(await sock.recv(4096)).header.id)
            return ids, server.counters()

    ids, counters = run(main)
    assert ids == set(range(2000)) and counters["dropped_busy"] == 0


def test_server_truncates_large_udp_answers_so_the_client_retries_over_tcp():
    async def main():
        async with serving() as (server, addr):
            plain = await ask_udp(addr, query("big.test"))
            edns = await ask_udp(addr, query("big.test", edns=4096))
            small_edns = await ask_udp(addr, query("big.test", edns=100))
            stream = await trio.open_tcp_stream(*addr)
            async with stream:
                await stream.send_all(frame(query("big.test")))
                tcp = await read_frame(stream)
            return plain, edns, small_edns, tcp, server.counters()

    plain, edns, small_edns, tcp, counters = run(main)
    rec = DNSRecord.parse(plain)
    assert len(plain) <= 512 and rec.header.tc == 1 and rec.rr == []
    assert rec.header.id == 0x1234 and str(rec.q.qname) == "big.test."
    assert len(edns) > 512 and DNSRecord.parse(edns).header.tc == 0 and len(addresses(edns)) == 40
    small = DNSRecord.parse(small_edns)  # an EDNS size under 512 counts as 512 (RFC 6891)
    assert small.header.tc == 1 and [rr.rtype for rr in small.ar] == [QTYPE.OPT]
    assert DNSRecord.parse(tcp).header.tc == 0 and len(addresses(tcp)) == 40
    assert counters["truncated"] == 2


def test_server_tcp_carries_several_queries_and_answers_each_as_it_completes():
    release = trio.Event()

    async def answer(wire):
        if str(DNSRecord.parse(wire).q.qname) == "slow.test.":
            await release.wait()
        return await big_answer(wire)

    async def main():
        async with serving(answer) as (_, addr):
            stream = await trio.open_tcp_stream(*addr)
            async with stream:
                both = frame(query("slow.test", qid=1)) + frame(query("a.test", qid=2))
                await stream.send_all(both)
                first = await read_frame(stream)
                release.set()
                second = await read_frame(stream)
                await stream.send_all(frame(query("b.test", qid=3)))
                third = await read_frame(stream)
            return [DNSRecord.parse(m).header.id for m in (first, second, third)]

    assert run(main) == [2, 1, 3]


def test_server_closes_idle_tcp_connections():
    async def main():
        async with serving(tcp_idle_timeout=0.2) as (server, addr):
            stream = await trio.open_tcp_stream(*addr)
            t0 = trio.current_time()
            with trio.fail_after(3):
                data = await stream.receive_some(100)
            await stream.aclose()
            return data, trio.current_time() - t0, server.counters()

    data, elapsed, counters = run(main)
    assert data == b"" and elapsed >= 0.2 and counters["tcp_idle_closed"] == 1


@pytest.mark.parametrize(("wire", "expect"), [
    (b"\x12\x34\x01", None),                                   # shorter than a header: dropped
    (reply(query("x.test")), None),                            # a response (QR): dropped
    (query("x.test")[:20], RCODE.FORMERR),                     # question cut short
    (bytes.fromhex("123401000000000000000000"), RCODE.FORMERR),  # no question
    (DNSRecord(DNSHeader(id=0x1234), questions=[DNSQuestion("a.test"), DNSQuestion("b.test")]
               ).pack(), RCODE.FORMERR),                       # two questions
    (DNSRecord(DNSHeader(id=0x1234, opcode=2), q=DNSQuestion("x.test")).pack(), RCODE.NOTIMP),
])
def test_server_drops_or_refuses_garbage_and_keeps_serving(wire, expect):
    async def main():
        async with serving() as (server, addr):
            bad = await ask_udp(addr, wire, timeout=0.3 if expect is None else 2)
            good = await ask_udp(addr, query("x.test"))
            stream = await trio.open_tcp_stream(*addr)
            async with stream:  # same over TCP, and the connection stays usable
                await stream.send_all(frame(wire))
                await stream.send_all(frame(query("x.test", qid=9)))
                tcp = await read_frame(stream)
                tcp_next = await read_frame(stream) if expect is not None else None
            return bad, good, tcp, tcp_next, server.counters()

    bad, good, tcp, tcp_next, counters = run(main)
    assert addresses(good) == ["192.0.2.1"]
    refused = counters["formerr"] + counters["notimp"]
    dropped = counters["dropped_garbage"] + counters["dropped_responses"]
    assert (refused, dropped) == ((0, 2) if expect is None else (2, 0))
    if expect is None:
        assert bad is None
        assert DNSRecord.parse(tcp).header.id == 9
    else:
        for out in (bad, tcp):
            h = DNSRecord.parse(out).header
            assert h.rcode == expect and h.id == 0x1234 and h.qr == 1
        assert DNSRecord.parse(tcp_next).header.id == 9


def test_server_answers_servfail_when_answer_fails_or_hangs():
    async def main():
        async with serving(answer_timeout=0.2) as (server, addr):
            boom = await ask_udp(addr, query("boom.test", qid=1))
            hang = await ask_udp(addr, query("hang.test", qid=2))
            return boom, hang, server.counters()

    boom, hang, counters = run(main)
    for qid, out in ((1, boom), (2, hang)):
        h = DNSRecord.parse(out).header
        assert h.rcode == RCODE.SERVFAIL and h.id == qid
    assert counters["answer_errors"] == 1 and counters["answer_timeouts"] == 1


def test_server_drops_udp_queries_beyond_its_concurrency_cap():
    started = trio.Event()
    release = trio.Event()

    async def answer(wire):
        started.set()
        await release.wait()
        return await big_answer(wire)

    async def main():
        async with serving(answer, max_queries=1) as (server, addr):
            async with trio.open_nursery() as nursery:
                results = {}

                async def first():
                    results["first"] = await ask_udp(addr, query("x.test", qid=1))

                nursery.start_soon(first)
                await started.wait()
                results["second"] = await ask_udp(addr, query("x.test", qid=2), timeout=0.3)
                release.set()
            return results, server.counters()

    results, counters = run(main)
    assert DNSRecord.parse(results["first"]).header.id == 1
    assert results["second"] is None and counters["dropped_busy"] == 1


def test_server_and_forwarder_work_over_ipv6():
    """An IPv6 listen address, and an IPv6 upstream given as "[addr]:port" (TC -> TCP too)."""
    async def main():
        server = DNSServer(("::1", 0), big_answer)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.run)
            fwd = Forwarder(parse_upstreams(f"[{host}]:{port}"))
            small = await fwd.forward(query("x.test"))
            big = await fwd.forward(query("big.test"))
            nursery.cancel_scope.cancel()
        return small, big, server.counters()

    small, big, counters = run(main)
    assert addresses(small) == ["192.0.2.1"] and len(addresses(big)) == 40
    assert counters["truncated"] == 1 and counters["tcp_queries"] == 1


def test_server_releases_its_port_when_cancelled():
    async def main():
        async with serving() as (_, addr):
            pass
        again = DNSServer(addr, big_answer)
        async with trio.open_nursery() as nursery:
            assert await nursery.start(again.run) == addr
            out = await ask_udp(addr, query("x.test"))
            nursery.cancel_scope.cancel()
        return out

    assert addresses(run(main)) == ["192.0.2.1"]


def test_server_on_a_taken_port_fails_with_a_clear_error():
    async def main():
        async with serving() as (_, addr):
            with pytest.raises(OSError, match=f"cannot listen on {addr[0]}:{addr[1]}"):
                await DNSServer(addr, big_answer).run()

    run(main)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80) | st.builds(lambda q, cut: q[:cut],
                                          st.sampled_from([query("x.test"), query("a.b.test",
                                                                                   edns=1232)]),
                                          st.integers(0, 60)))
def test_server_query_check_never_raises(wire):
    """Garbage in is dropped or refused, never a crash."""
    out = DNSServer((LOOP, 0), big_answer)._check(wire)
    assert out is None or isinstance(out, bytes | Query)
    if isinstance(out, Query):
        assert out.wire == wire and len(DNSRecord.parse(wire).questions) == 1
    elif isinstance(out, bytes):
        assert DNSRecord.parse(out).header.rcode in (RCODE.FORMERR, RCODE.NOTIMP)


# -- the client's resolver -------------------------------------------------------------------


def make_mapper(v4_magic="100.80.0.0-100.80.0.255", v4_transit="169.254.128.0-169.254.128.255"):
    pools = Pools(
        v4_magic=IPSet.of([IPRange.parse(v4_magic)]),
        v6_magic=IPSet.of([IPRange.parse("fd7a:115c:a1e0:ab12::-fd7a:115c:a1e0:ab12::ff")]),
        v4_transit=IPSet.of([IPRange.parse(v4_transit)]),
        v6_transit=IPSet.of([IPRange.parse("fd7a:115c:a1e0:ab13::-fd7a:115c:a1e0:ab13::ff")]),
    )
    node = Member("laptop", (ip("100.64.0.1"),), ("192.0.2.1", 41641), public_key("laptop"))
    config = NodeConfig(tailnet=Tailnet(nodes=(node,)), node=node, advertise_connector=False,
                        apps=(APP,), pools=pools, app_users=frozenset({node.name}))
    store = Assignments(pools)
    return DNSMapper(config, store), store


def answers_only(resolve):
    """A resolve_at_connector made of one that answers with DNS bytes and maps no offer."""

    async def with_offers(app, wire, offers, assigned):
        return "connector-1", ResolveAnswer(answer=await resolve(app, wire))

    return with_offers


class Connector:
    """Fake resolve_at_connector + register: resolves at ``upstream``, acks by attaching.

    With ``maps_offers`` it maps the answer's addresses onto the offers as a
    connector does (:func:`peerapi.offered_mappings`), refusing those in
    ``refuse``; without, it maps none, so every new assignment is registered.
    """

    def __init__(self, store, upstream, ack="attach", maps_offers=False):
        self.store = store
        self.forwarder = Forwarder([upstream])
        self.ack = ack  # "attach", "never", "refuse"
        self.maps_offers = maps_offers
        self.refuse: set[str] = set()  # destinations whose mapping is refused
        self.resolved = []
        self.offered = []
        self.assigned = []
        self.registered = []
        self.ack_now = trio.Event()

    async def resolve(self, app, wire, offers=(), assigned=None):
        self.resolved.append((app.name, DNSRecord.parse(wire).q.qname))
        self.offered.append(list(offers))
        self.assigned.append(dict(assigned or {}))
        answer = await self.forwarder.forward(wire)
        if not self.maps_offers:
            return "connector-1", ResolveAnswer(answer=answer)
        domain, _, addrs = answer_addresses(answer)
        req = peerapi.offered_mappings(app.name, domain, [a for a, _ in addrs], offers,
                                       assigned)
        return "connector-1", ResolveAnswer(answer=answer, transit_ips=[
            MappedTransitIP(i.transit_ip, i.destination_ip,
                            Code.OTHER if i.destination_ip in self.refuse else Code.OK)
            for i in req.transit_ips])

    def mapped(self, a, connector):
        self.store.attach(a.transit, connector)

    async def register(self, assignments):
        self.registered.append([(str(a.real), str(a.magic)) for a in assignments])
        if self.ack == "never":
            await trio.sleep_forever()
        if self.ack == "refuse":
            return False
        if self.ack == "wait":
            await self.ack_now.wait()
        for a in assignments:
            self.store.attach(a.transit, "connector-1")
        return True


def resolver(dnsmasq, ack="attach", ack_timeout=0.2, maps_offers=False, **kw):
    mapper, store = make_mapper(**kw)
    conn = Connector(store, dnsmasq, ack, maps_offers)
    res = ClientResolver(mapper, Forwarder([dnsmasq]), conn.resolve, conn.register, conn.mapped,
                         ack_timeout=ack_timeout, now=lambda: 1_700_000_000.0)
    return res, conn, store


class RecordingForwarder:
    """Records what it is given to forward; answers SERVFAIL; caches nothing."""

    def __init__(self):
        self.got = []
        self.cache = ForwardCache()

    def now(self):
        return 0.0

    def count_cache_hit(self):
        raise AssertionError("nothing is cached here")

    async def forward(self, query):
        self.got.append(query)
        return servfail_to(query)


def test_a_query_is_parsed_once_and_the_forwarder_takes_the_parsed_value(monkeypatch):
    parsed = []
    real = dns_resolver.parse
    monkeypatch.setattr(dns_resolver, "parse", lambda wire: parsed.append(wire) or real(wire))
    mapper, _ = make_mapper()
    fwd = RecordingForwarder()

    async def never(*args):
        raise AssertionError("a non-app query went to a connector")

    res = ClientResolver(mapper, fwd, never, never, never, now=lambda: 1_700_000_000.0)
    wire = query("plain.test")
    out = trio.run(res.answer, wire)
    assert parsed == [wire]
    assert len(fwd.got) == 1 and isinstance(fwd.got[0], Query) and fwd.got[0].wire == wire
    assert DNSRecord.parse(out).header.rcode == RCODE.SERVFAIL
    assert res.counters()["forwarded"] == 1


def test_a_cached_forwarded_answer_is_served_for_other_names_never_for_an_app_name():
    """The forwarder's cache may hold an app name's real answer (a connector on this node
    resolved it): the client's fast path serves it for no app name, only for others."""
    mapper, _ = make_mapper()
    fwd = Forwarder([closed_port()], clock=lambda: 100.0)

    async def never(*args):
        raise AssertionError("no connector is asked here")

    res = ClientResolver(mapper, fwd, never, never, never, now=lambda: 1_700_000_000.0)
    for name in ("app.test", "plain.test"):
        q = query(name, qid=1)
        assert fwd.cache.put(parse(q), reply(q, RR(name, rdata=A("198.51.100.7"), ttl=60)),
                             100.0)
    assert res.cached(query("app.test", qid=2)) is None
    hit = res.cached(query("plain.test", qid=3))
    assert hit is not None and DNSRecord.parse(hit).header.id == 3
    assert str(DNSRecord.parse(hit).a.rdata) == "198.51.100.7"
    assert (res.counters()["forwarded"], fwd.counters()["cache_hits"]) == (1, 1)


def test_app_query_is_answered_with_magic_ip_after_the_ack(dnsmasq):
    """Resolved at the connector, mapped, registered, then answered."""
    res, conn, store = resolver(dnsmasq)

    async def main():
        return await res.answer(query("app.test", qid=0xA1)), \
            await res.answer(query("app.test", "AAAA", qid=0xA2))

    v4, v6 = run(main)
    rec = DNSRecord.parse(v4)
    assert rec.header.id == 0xA1 and rec.header.rcode == RCODE.NOERROR
    assert addresses(v4) == ["100.80.0.0"] and rec.rr[0].ttl == 300
    assert addresses(v6) == ["fd7a:115c:a1e0:ab12::"] and DNSRecord.parse(v6).header.id == 0xA2
    assert conn.resolved == [("App", "app.test."), ("App", "app.test.")]
    assert conn.registered == [[("203.0.113.5", "100.80.0.0")],
                               [("2001:db8::5", "fd7a:115c:a1e0:ab12::")]]
    assert store.by_magic(ip("100.80.0.0")).connector == "connector-1"
    counters = res.counters()
    assert counters["app_queries"] == 2 and counters["answered_mapped"] == 2
    assert counters["assignments_new"] == 2 and counters["forwarded"] == 0


def test_cname_chain_is_collapsed_and_repeat_query_needs_no_new_registration(dnsmasq):
    """CNAME chains collapsed through the shell; an acknowledged assignment is not
    registered again."""
    res, conn, _ = resolver(dnsmasq)

    async def main():
        return [await res.answer(query("WWW.App.Test", qid=i)) for i in (1, 2)]

    first, second = run(main)
    for out in (first, second):
        rec = DNSRecord.parse(out)
        assert [(str(rr.rname), rr.rtype) for rr in rec.rr] == [("WWW.App.Test.", QTYPE.A)]
        assert addresses(out) == ["100.80.0.0"]
    assert conn.registered == [[("203.0.113.10", "100.80.0.0")]]


def test_app_query_gets_servfail_when_the_ack_does_not_come_in_time(dnsmasq):
    """Register never returns -> SERVFAIL after ack_timeout, counted."""
    res, conn, store = resolver(dnsmasq, ack="never", ack_timeout=0.2)

    async def main():
        t0 = trio.current_time()
        out = await res.answer(query("app.test", qid=0x77))
        return out, trio.current_time() - t0

    out, elapsed = run(main)
    rec = DNSRecord.parse(out)
    assert rec.header.rcode == RCODE.SERVFAIL and rec.header.id == 0x77 and rec.rr == []
    assert 0.2 <= elapsed < 2
    assert res.counters()["servfail_ack_timeout"] == 1
    assert len(store) == 1 and conn.registered == [[("203.0.113.5", "100.80.0.0")]]

    # The client asks again: the unacknowledged assignment is registered again, then answered.
    conn.ack = "attach"
    again = run(res.answer, query("app.test", qid=0x78))
    assert addresses(again) == ["100.80.0.0"]
    assert conn.registered[1] == [("203.0.113.5", "100.80.0.0")]


def test_app_query_gets_servfail_when_the_connector_refuses(dnsmasq):
    res, _, _ = resolver(dnsmasq, ack="refuse")
    out = run(res.answer, query("app.test"))
    assert DNSRecord.parse(out).header.rcode == RCODE.SERVFAIL
    assert res.counters()["servfail_register"] == 1


def test_concurrent_queries_for_one_name_all_wait_for_the_one_registration(dnsmasq):
    """The second query reuses the assignment but still waits for its ack. (Spelt in
    another case, so that it is no retry of the first: both are resolved.)"""
    res, conn, _ = resolver(dnsmasq, ack="wait", ack_timeout=5)

    async def main():
        outs = {}

        async def ask(qid):
            outs[qid] = await res.answer(query("app.test" if qid == 1 else "App.Test", qid=qid))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 1)
            nursery.start_soon(ask, 2)
            with trio.fail_after(3):
                while len(conn.resolved) < 2 or not conn.registered:
                    await trio.sleep(0)  # let both reach the mapping step
                await trio.testing.wait_all_tasks_blocked()
            assert outs == {}  # nobody answered before the ack
            conn.ack_now.set()
        return outs

    outs = run(main)
    assert {qid: addresses(o) for qid, o in outs.items()} == {1: ["100.80.0.0"],
                                                              2: ["100.80.0.0"]}
    assert len(conn.registered) == 1


# -- a fresh name in one exchange -------------------------------------------------------------


def transit_in_use(store, v):
    return store.pool_usage()[f"v{v}Transit"]["inUse"]


def test_a_fresh_name_costs_one_exchange_with_the_connector_and_no_registration(dnsmasq):
    """The query carries transit offers of its family; the connector maps the answer onto
    them; the answer goes out with no registration, and unused offers go back to the pool."""
    res, conn, store = resolver(dnsmasq, maps_offers=True)

    async def main():
        return await res.answer(query("app.test", qid=1)), \
            await res.answer(query("app.test", "AAAA", qid=2))

    v4, v6 = run(main)
    assert addresses(v4) == ["100.80.0.0"] and addresses(v6) == ["fd7a:115c:a1e0:ab12::"]
    assert len(conn.resolved) == 2 and conn.registered == []
    assert [len(o) for o in conn.offered] == [DEFAULT_OFFERS, DEFAULT_OFFERS]
    assert [{o.version for o in offers} for offers in conn.offered] == [{4}, {6}]
    a4, a6 = store.by_magic(ip("100.80.0.0")), store.by_magic(ip("fd7a:115c:a1e0:ab12::"))
    # The assignment holds the offer the connector mapped, registered with that connector.
    assert a4.transit == conn.offered[0][0] and a4.connector == "connector-1"
    assert a6.transit == conn.offered[1][0] and a6.connector == "connector-1"
    assert (transit_in_use(store, 4), transit_in_use(store, 6)) == (1, 1)
    c = res.counters()
    assert (c["mapped_in_resolution"], c["answered_mapped"], c["registrations"]) == (2, 2, 0)


def test_addresses_beyond_the_offers_and_refused_offers_are_registered_separately(dnsmasq):
    res, conn, store = resolver(dnsmasq, maps_offers=True)
    res.offers = 2
    conn.refuse = {MULTI[1]}
    out = run(res.answer, query("multi.app.test"))
    assert len(addresses(out)) == 3 and len(conn.resolved) == 1
    # One mapped while resolving; the refused one and the one beyond the offers registered.
    assert sorted(real for real, _ in conn.registered[0]) == MULTI[1:]
    assert len(conn.registered) == 1 and res.counters()["mapped_in_resolution"] == 1
    assert all(store.by_domain_real("multi.app.test.", ip(r)).connector == "connector-1"
               for r in MULTI)
    assert transit_in_use(store, 4) == 3


def test_a_repeated_name_reuses_its_assignment_and_returns_the_offers(dnsmasq):
    """Past the cached answer's TTL the name is asked again: the old assignment stays
    (its magic IP may be cached by applications), so the new offers all go back."""
    clock = [1_700_000_000.0]
    mapper, store = make_mapper()
    conn = Connector(store, dnsmasq, maps_offers=True)
    res = ClientResolver(mapper, Forwarder([dnsmasq]), conn.resolve, conn.register, conn.mapped,
                         now=lambda: clock[0])
    first = run(res.answer, query("app.test"))
    clock[0] += 301
    again = run(res.answer, query("app.test"))
    assert addresses(first) == addresses(again) == ["100.80.0.0"]
    assert len(conn.resolved) == 2 and conn.registered == [] and transit_in_use(store, 4) == 1
    a = store.by_magic(ip("100.80.0.0"))
    assert a.transit == conn.offered[0][0]
    # The second asks with the address's transit IP, which the connector maps again (so
    # the peer's address never gets a second transit IP) and no offer is used.
    assert conn.assigned == [{}, {a.real: a.transit}]


@pytest.mark.parametrize("result", ["not offered", "other family", "twice", "garbage"])
def test_a_connector_result_for_what_we_did_not_offer_is_not_taken(dnsmasq, result):
    """What a connector says is input: an item naming a transit IP we did not offer (or
    the same offer twice, or another family) is ignored and the address registered."""
    mapper, store = make_mapper()
    conn = Connector(store, dnsmasq)

    async def hostile(app, wire, offers, assigned):
        answer = await conn.forwarder.forward(wire)
        transit = {"not offered": "169.254.128.250", "other family": "fd7a:115c:a1e0:ab13::9",
                   "twice": str(offers[0]), "garbage": "not an address"}[result]
        items = [MappedTransitIP(transit, "203.0.113.5")]
        if result == "twice":
            items.append(MappedTransitIP(transit, "203.0.113.5"))
        return "connector-1", ResolveAnswer(answer=answer, transit_ips=items)

    res = ClientResolver(mapper, Forwarder([dnsmasq]), hostile, conn.register, conn.mapped,
                         now=lambda: 1_700_000_000.0)
    out = run(res.answer, query("app.test"))
    assert addresses(out) == ["100.80.0.0"]
    a = store.by_magic(ip("100.80.0.0"))
    if result == "twice":  # the first mention of an offer counts, once
        assert conn.registered == [] and res.counters()["mapped_in_resolution"] == 1
    else:
        assert conn.registered == [[("203.0.113.5", "100.80.0.0")]]
        assert str(a.transit) != "169.254.128.250"
    assert transit_in_use(store, 4) == 1


def test_offers_go_back_to_the_pool_when_the_connector_fails(dnsmasq):
    mapper, store = make_mapper()
    conn = Connector(store, dnsmasq)

    async def fails(app, wire, offers, assigned):
        assert len(offers) == DEFAULT_OFFERS and transit_in_use(store, 4) == DEFAULT_OFFERS
        raise OSError("connection refused")

    res = ClientResolver(mapper, Forwarder([dnsmasq]), fails, conn.register, conn.mapped)
    out = run(res.answer, query("app.test"))
    assert DNSRecord.parse(out).header.rcode == RCODE.SERVFAIL
    assert transit_in_use(store, 4) == 0 and len(store) == 0


def test_offers_never_take_more_than_half_of_a_small_pool(dnsmasq):
    res, conn, store = resolver(dnsmasq, maps_offers=True,
                                v4_transit="169.254.128.0-169.254.128.3")
    out = run(res.answer, query("multi.app.test"))
    assert len(addresses(out)) == 3
    assert len(conn.offered[0]) == 2 and len(conn.registered[0]) == 1
    assert transit_in_use(store, 4) == 3


def test_the_same_app_question_again_while_it_is_answered_waits_for_that_answer(dnsmasq):
    """A stub resolver's retry costs the connector nothing more: one resolution, one set
    of offers, and each asker gets the answer under its own id."""
    res, conn, _ = resolver(dnsmasq, maps_offers=True)
    gate = trio.Event()
    resolve = conn.resolve

    async def slow(app, wire, offers, assigned):
        await gate.wait()
        return await resolve(app, wire, offers, assigned)

    res.resolve_at_connector = slow

    async def main():
        outs = {}

        async def ask(qid):
            outs[qid] = await res.answer(query("app.test", qid=qid))

        async with trio.open_nursery() as nursery:
            for qid in (1, 2, 3):
                nursery.start_soon(ask, qid)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        return outs

    outs = run(main)
    assert {qid: (DNSRecord.parse(o).header.id, addresses(o)) for qid, o in outs.items()} == {
        1: (1, ["100.80.0.0"]), 2: (2, ["100.80.0.0"]), 3: (3, ["100.80.0.0"])}
    assert len(conn.resolved) == 1 and res.counters()["coalesced"] == 2


def test_servfail_from_mapping_still_registers_its_new_assignments(dnsmasq):
    """Pool runs out half-way (one magic IP for two addresses): SERVFAIL, first registered."""
    mapper, store = make_mapper(v4_magic="100.80.0.0")
    conn = Connector(store, dnsmasq)

    async def two_addresses(app, wire):
        return reply(wire, *a_records("app.test", ["203.0.113.5", "203.0.113.6"]))

    res = ClientResolver(mapper, Forwarder([dnsmasq]), answers_only(two_addresses),
                         conn.register, conn.mapped,
                         ack_timeout=1, now=lambda: 1_700_000_000.0)
    out = run(res.answer, query("app.test"))
    rec = DNSRecord.parse(out)
    assert rec.header.rcode == RCODE.SERVFAIL and rec.rr == []
    assert conn.registered == [[("203.0.113.5", "100.80.0.0")]]
    assert res.counters()["servfail_mapping"] == 1


@pytest.mark.parametrize("failure", ["raises", "hangs", "other name", "garbage"])
def test_connector_failure_gives_servfail_counted(dnsmasq, failure):
    mapper, store = make_mapper()
    conn = Connector(store, dnsmasq)

    async def resolve(app, wire):
        if failure == "raises":
            raise OSError("connection refused")
        if failure == "hangs":
            await trio.sleep_forever()
        if failure == "other name":
            return reply(wire, *a_records("evil.test", ["192.0.2.66"]), name="evil.app.test")
        return b"\x00"

    res = ClientResolver(mapper, Forwarder([dnsmasq]), answers_only(resolve), conn.register,
                         conn.mapped, resolve_timeout=0.2)
    out = run(res.answer, query("app.test", qid=5))
    h = DNSRecord.parse(out).header
    assert h.rcode == RCODE.SERVFAIL and h.id == 5
    assert res.counters()["servfail_connector"] == 1
    assert len(store) == 0 and conn.registered == []


def test_connector_answer_with_zero_id_is_answered_with_the_query_id(dnsmasq):
    """DoH-style channels may zero the id; the application still gets its own."""
    mapper, store = make_mapper()
    conn = Connector(store, dnsmasq)

    async def resolve(app, wire):
        return reply(wire, *a_records("app.test", ["203.0.113.5"]), qid=0)

    res = ClientResolver(mapper, Forwarder([dnsmasq]), answers_only(resolve), conn.register,
                         conn.mapped)
    out = run(res.answer, query("app.test", qid=0x5555))
    assert DNSRecord.parse(out).header.id == 0x5555 and addresses(out) == ["100.80.0.0"]


def test_non_app_names_are_forwarded_byte_for_byte(dnsmasq):
    """Other names go upstream unchanged; no connector, no assignment."""
    res, conn, store = resolver(dnsmasq)
    q = query("plain.test", qid=0x3131, edns=1232)
    direct = ask_udp_sync(dnsmasq, q)
    out = run(res.answer, q)
    assert out == direct and addresses(out) == ["198.51.100.200"]
    assert conn.resolved == [] and len(store) == 0
    assert res.counters()["forwarded"] == 1 and res.counters()["app_queries"] == 0


def test_server_with_client_resolver_end_to_end(dnsmasq):
    """The pieces together over loopback: app name -> magic, other name -> real."""
    res, _, _ = resolver(dnsmasq)

    async def main():
        async with serving(res.answer) as (_, addr):
            app = await ask_udp(addr, query("app.test"))
            stream = await trio.open_tcp_stream(*addr)
            async with stream:
                await stream.send_all(frame(query("plain.test", "A")))
                other = await read_frame(stream)
            return app, other

    app, other = run(main)
    assert addresses(app) == ["100.80.0.0"] and addresses(other) == ["198.51.100.200"]



# -- the answer cache in the resolver and the server ---------------------------------------------


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def cached_resolver(dnsmasq):
    mapper, store = make_mapper()
    conn = Connector(store, dnsmasq)
    clock = Clock()
    res = ClientResolver(mapper, Forwarder([dnsmasq]), conn.resolve, conn.register, conn.mapped,
                         now=clock)
    return res, conn, store, clock


def test_a_repeated_app_query_is_answered_from_the_cache_with_the_ttl_counted_down(dnsmasq):
    res, conn, _, clock = cached_resolver(dnsmasq)

    async def main():
        first = await res.answer(query("app.test", qid=1))
        clock.t += 100.5
        return first, await res.answer(query("app.test", qid=2))

    first, second = run(main)
    assert addresses(second) == addresses(first) == ["100.80.0.0"]
    assert DNSRecord.parse(second).header.id == 2
    assert [rr.ttl for rr in DNSRecord.parse(second).rr] == [200]
    assert conn.resolved == [("App", "app.test.")]  # asked the connector once
    counters = res.counters()
    assert counters["answered_cached"] == 1 and counters["answered_mapped"] == 1
    assert counters["queries"] == counters["app_queries"] == 2


def test_after_the_ttl_the_connector_is_asked_again(dnsmasq):
    res, conn, _, clock = cached_resolver(dnsmasq)

    async def main():
        await res.answer(query("app.test"))
        clock.t += 300
        return await res.answer(query("app.test"))

    assert addresses(run(main)) == ["100.80.0.0"]
    assert len(conn.resolved) == 2 and res.counters()["answered_cached"] == 0


@pytest.mark.parametrize("change", ["unregistered", "reclaimed", "reloaded"])
def test_a_cached_answer_is_not_used_once_its_mapping_is_not_the_live_one(dnsmasq, change):
    """Answering only after the connector's ack holds for cached answers too: every magic
    IP in one is registered and live."""
    res, conn, store, clock = cached_resolver(dnsmasq)

    async def main():
        await res.answer(query("app.test"))
        a = store.by_magic(ip("100.80.0.0"))
        if change == "unregistered":
            a.connector = None  # as while the registrar moves it to another connector
        elif change == "reclaimed":
            clock.t += 100
            store._remove(a)  # what reclaiming does, here before the TTL ran out
        else:
            res.reconfigure(res.mapper.config)
        return await res.answer(query("app.test"))

    out = run(main)
    assert addresses(out) and len(conn.resolved) == 2
    assert len(conn.registered) == (1 if change == "reloaded" else 2)
    assert res.counters()["answered_cached"] == 0


def test_a_servfail_is_not_cached(dnsmasq):
    mapper, store = make_mapper()
    conn = Connector(store, dnsmasq, ack="refuse")
    res = ClientResolver(mapper, Forwarder([dnsmasq]), conn.resolve, conn.register, conn.mapped)

    async def main():
        return [await res.answer(query("app.test")) for _ in range(2)]

    assert all(DNSRecord.parse(w).header.rcode == RCODE.SERVFAIL for w in run(main))
    assert len(conn.resolved) == 2 and len(res.cache) == 0


def test_the_server_answers_cached_questions_in_its_receive_loop(dnsmasq):
    """UDP hits never reach ``answer``; a miss, or an answer too big for UDP, does."""
    res, conn, _, _ = cached_resolver(dnsmasq)
    calls = []

    async def answer(wire):
        calls.append(DNSRecord.parse(wire).q.qname)
        return await res.answer(wire)

    async def main():
        async with serving(answer, cached=res.cached) as (server, addr):
            out = [await ask_udp(addr, query("app.test", qid=i)) for i in range(3)]
            return out, server.counters()

    out, counters = run(main)
    assert [DNSRecord.parse(w).header.id for w in out] == [0, 1, 2]
    assert all(addresses(w) == ["100.80.0.0"] for w in out)
    assert len(calls) == 1 and len(conn.resolved) == 1
    assert counters["udp_queries"] == 3 and res.counters()["answered_cached"] == 2


def test_a_cached_lookup_that_raises_is_an_internal_error_and_the_query_still_answered():
    def broken(_wire):
        raise RuntimeError("cache bug")

    async def main():
        async with serving(cached=broken) as (server, addr):
            return await ask_udp(addr, query("x.test")), server.counters()

    out, counters = run(main)
    assert addresses(out) == ["192.0.2.1"] and counters["internal_errors"] == 1


@pytest.mark.parametrize("odd", [b"\x01", b"@", b"a\x00b", b"a.b"])
def test_odd_name_under_an_app_wildcard_goes_to_the_connector_and_never_leaks(odd):
    """The resolver asks the mapper whether a name is an app's: the labels decide."""
    mapper, _ = make_mapper()
    resolved = []

    async def resolve(app, wire):
        rec = DNSRecord.parse(wire)
        resolved.append((app.name, rec.q.qname.label))
        reply = rec.reply()
        reply.add_answer(RR(rec.q.qname, QTYPE.A, rdata=A("203.0.113.5"), ttl=60))
        return bytes(reply.pack())

    async def register(_assignments):
        raise AssertionError("a name without text form is not registered")

    res = ClientResolver(mapper, Forwarder([]), answers_only(resolve), register, register,
                         now=lambda: 1_700_000_000.0)
    q = DNSRecord(DNSHeader(id=0x77, rd=1), q=DNSQuestion("x.invalid"))
    q.q.qname = [odd, b"www", b"APP", b"test"]

    out = run(res.answer, bytes(q.pack()))
    assert resolved == [("App", (odd, b"www", b"APP", b"test"))]
    assert DNSRecord.parse(out).header.rcode == RCODE.SERVFAIL
    assert ip("203.0.113.5").packed not in out
    assert res.counters()["forwarded"] == 0
