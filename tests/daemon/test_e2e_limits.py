"""Limits that keep one node or process from starving the others, end to end in network
namespaces this module creates (conn25.lab.testbed): a peer holding hundreds of idle
connections to the connector's peer API, and a local process holding hundreds of idle
TCP connections to the client's DNS server. Every process a test starts is stopped by
PID in a finaliser; every bound is stated where it is waited for."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conn25.daemon.peerapi_server import PEERAPI_LIMITS
from conn25.lab.netns import terminate, wait_for
from conn25.lab.testbed import DEFAULT_NODES, Testbed

pytestmark = pytest.mark.root

SPEC = {n.name: n for n in DEFAULT_NODES}
CONN1 = SPEC["conn1"]
MAGIC4 = ipaddress.ip_network("100.80.0.0/16")

# Opens N TCP connections to HOST:PORT, writes how many it holds to FILE, then holds them
# (sending nothing) until it is stopped.
HOLDER = textwrap.dedent("""
    import signal, socket, sys
    host, port, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    held = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
    with open(out, "w") as f:
        f.write(str(len(held)))
    signal.pause()
""")

RESOLVE = textwrap.dedent("""
    import socket, sys
    for name in sys.argv[1:]:
        print(socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
""")

TCP_QUERY = textwrap.dedent("""
    import socket, sys
    from dnslib import DNSRecord
    q = DNSRecord.question(sys.argv[1]).pack()
    with socket.create_connection(("100.100.100.100", 53), timeout=5) as s:
        s.sendall(len(q).to_bytes(2, "big") + q)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            data = s.recv(65536)
            if not data:
                sys.exit("closed without an answer")
            buf += data
    print(DNSRecord.parse(buf[2:]).short())
""")


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with Testbed.serving(tmp_path_factory.mktemp("testbed-limits"),
                         ("conn1", "peer", "client")) as tb:
        yield tb


def hold(bed: Testbed, node: str, host: str, port: int, n: int,
         tmp_path: Path) -> subprocess.Popen:
    """A process in ``node`` holding ``n`` idle connections (the caller stops it)."""
    out = tmp_path / f"held-{node}-{port}"
    proc = bed.ns[node].popen(sys.executable, "-c", HOLDER, host, str(port), str(n), str(out),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: proc.poll() is not None or (out.exists() and out.read_text()), 30,
             f"{n} connections from {node} to {host}:{port}")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    assert int(out.read_text()) == n
    return proc


def metrics(bed: Testbed, node: str) -> dict[str, int]:
    doc = bed.status(node)
    assert doc is not None
    return doc["metrics"]


def test_a_peer_holding_many_idle_connections_does_not_starve_a_restarted_client(
        bed: Testbed, tmp_path: Path) -> None:
    """300 idle connections from bob's node to conn1's peer API (more than the whole pool
    used to hold); the client restarts, so it needs new connections, and still resolves
    fresh app names at once."""
    before = metrics(bed, "conn1")["refusals_peerapi_connections_per_source"]
    holder = hold(bed, "peer", CONN1.overlay4, 41642, 300, tmp_path)
    try:
        per_peer = PEERAPI_LIMITS.per_source
        assert per_peer is not None
        wait_for(lambda: metrics(bed, "conn1")["refusals_peerapi_connections_per_source"]
                 - before >= 300 - per_peer.max_connections, 10,
                 "conn1 to refuse the connections over bob's share")
        assert bed.stop("client") == 0
        bed.start("client")
        names = [f"starve{i}.wild.example.com" for i in range(5)]
        start = time.monotonic()
        r = bed.run("client", sys.executable, "-c", RESOLVE, *names, timeout=30)
        elapsed = time.monotonic() - start
        assert r.returncode == 0, r.stderr
        magics = r.stdout.split()
        assert len(magics) == 5 and all(ipaddress.ip_address(m) in MAGIC4 for m in magics)
        assert elapsed < 15, f"5 fresh names took {elapsed:.1f} s"
        assert holder.poll() is None  # the attack was on all along
    finally:
        terminate(holder)


def test_the_peer_api_answers_no_one_but_other_nodes(bed: Testbed) -> None:
    """A process on the connector itself (source: its own overlay address, no other node's)
    gets its connection closed without an answer."""
    script = textwrap.dedent(f"""
        import socket
        with socket.create_connection(("{CONN1.overlay4}", 41642), timeout=5) as s:
            s.sendall(b"GET /v0/health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            try:
                print(repr(s.recv(100)))
            except ConnectionResetError:
                print("reset")
    """)
    before = metrics(bed, "conn1")["refusals_peerapi_not_peer"]
    r = bed.run("conn1", sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("b''", "reset")
    wait_for(lambda: metrics(bed, "conn1")["refusals_peerapi_not_peer"] > before, 5,
             "the refusal to be counted")


def test_200_idle_tcp_connections_to_the_dns_server_do_not_block_a_tcp_query(
        bed: Testbed, tmp_path: Path) -> None:
    holder = hold(bed, "client", "100.100.100.100", 53, 200, tmp_path)
    try:
        start = time.monotonic()
        r = bed.run("client", sys.executable, "-c", TCP_QUERY, "tcp1.wild.example.com",
                    timeout=20)
        assert r.returncode == 0, r.stderr
        assert ipaddress.ip_address(r.stdout.split()[0]) in MAGIC4
        assert time.monotonic() - start < 8
        assert metrics(bed, "client")["dns_server_tcp_evicted"] >= 200 - 64
    finally:
        terminate(holder)


UDP_QUERY = textwrap.dedent("""
    import socket, sys
    from dnslib import DNSRecord
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)  # how long "no answer" is waited for
        s.sendto(DNSRecord.question(sys.argv[1]).pack(), ("100.100.100.100", 53))
        try:
            print(DNSRecord.parse(s.recv(65535)).short() or "empty")
        except socket.timeout:
            print("none")
""")


def test_the_dns_server_answers_another_host_only_when_dns_allow_names_it(bed: Testbed) -> None:
    """The "internet" host routes 100.100.100.100 to the client: unanswered and counted;
    with --dns-allow naming its network, answered."""
    client, inet = SPEC["client"], bed.ns["inet"]
    inet.run("ip", "route", "add", "100.100.100.100/32", "via", client.link4)
    try:
        before = metrics(bed, "client")["refusals_dns_source"]
        r = inet.run(sys.executable, "-c", UDP_QUERY, "allow1.wild.example.com")
        assert r.stdout.strip() == "none"
        wait_for(lambda: metrics(bed, "client")["refusals_dns_source"] > before, 5,
                 "the refused query to be counted")
        assert bed.stop("client") == 0
        bed.start("client", "--dns-allow", f"{client.gw4}/32")
        r = inet.run(sys.executable, "-c", UDP_QUERY, "allow2.wild.example.com")
        assert ipaddress.ip_address(r.stdout.split()[0]) in MAGIC4, r.stdout
    finally:
        inet.run("ip", "route", "del", "100.100.100.100/32", check=False)
        if "client" in bed.procs:
            bed.stop("client")
        bed.start("client")
