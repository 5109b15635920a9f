"""What a node forwards, tried as an attacker would, and flows across restarts.

In namespaces this module creates (conn25.lab.testbed): a connector is not a router
for tailnet members, nothing from the internet enters the tailnet through it, a
node's DNS server answers no other node, and a download in flight completes
across a SIGKILL and restart of the client and of the connector. Crafted
overlay datagrams are sent from a node's own underlay endpoint while its
conn25d is stopped (the endpoint is its identity on the overlay).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conn25.lab.netns import wait_for
from conn25.lab.testbed import DEFAULT_NODES, SOLO4, WEB4, Testbed

pytestmark = pytest.mark.root

SPEC = {n.name: n for n in DEFAULT_NODES}
CONN1, CLIENT = SPEC["conn1"], SPEC["client"]
SIZE = 4_000_000


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with Testbed.serving(tmp_path_factory.mktemp("forwarding"), ("conn1", "client")) as tb:
        yield tb


# Counts UDP datagrams on addr:port until its stdin closes; prints "ready" first, the
# count last.
COUNTER = """
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
n = 0
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    if s in r:
        s.recv(65535)
        n += 1
    if sys.stdin in r and not sys.stdin.readline():
        break
print(n, flush=True)
"""


class Counter:
    """A UDP counter in a namespace of the testbed (stopped by close())."""

    def __init__(self, bed: Testbed, ns: str, addr: str, port: int) -> None:
        self.proc = bed.ns[ns].popen(sys.executable, "-c", COUNTER, addr, str(port),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def close(self) -> int:
        out, _ = self.proc.communicate("", timeout=10)
        return int(out.split()[-1])


def send_overlay(bed: Testbed, node: str, to: str, packet: str, count: int) -> None:
    """`count` overlay datagrams holding the scapy `packet` expression, from `node`'s
    endpoint (its conn25d must be stopped) to node `to`'s endpoint."""
    src, dst = SPEC[node].endpoint, SPEC[to].endpoint
    script = textwrap.dedent(f"""
        import socket
        from scapy.all import DNS, DNSQR, IP, TCP, UDP
        inner = bytes({packet})
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("{src}", 41641))
        for _ in range({count}):
            s.sendto(b"\\x01\\x01\\x00\\x00" + inner, ("{dst}", 41641))
    """)
    r = bed.run(node, sys.executable, "-c", script, timeout=60)
    assert r.returncode == 0, r.stderr


def datapath(bed: Testbed, node: str) -> dict:
    doc = bed.status(node)
    assert doc is not None, f"{node} does not answer"
    return doc["datapath"]


def grew(bed: Testbed, node: str, counter: str, by: int, before: dict) -> None:
    wait_for(lambda: datapath(bed, node)[counter] >= before[counter] + by, 15,
             f"{node}'s {counter} to grow by {by}")


@pytest.mark.parametrize("attacker", ["blocked", "client"])
def test_a_member_cannot_use_the_connector_as_a_router(bed, attacker):
    """Raw overlay packets to an internet host that no app resolved, from a node the
    policy refuses every app and from an allowed client: none leaves the connector."""
    counter = Counter(bed, "inet", WEB4, 9999)
    before = datapath(bed, "conn1")
    if attacker == "client":
        bed.stop("client")
    try:
        me = SPEC[attacker].overlay4
        send_overlay(bed, attacker, "conn1",
                     f'IP(src="{me}", dst="{WEB4}") / UDP(sport=4000, dport=9999) / b"x"', 1000)
        send_overlay(bed, attacker, "conn1",
                     f'IP(src="{me}", dst="{WEB4}") / TCP(sport=4000, dport=80, flags="S")', 100)
        grew(bed, "conn1", "drop_dst_not_allowed", 1100, before)
    finally:
        if attacker == "client":
            bed.start("client")
    assert counter.close() == 0
    assert datapath(bed, "conn1")["translated"] == before["translated"]


@pytest.mark.parametrize("source", [WEB4, "169.254.128.9"])
def test_an_internet_host_cannot_send_into_the_tailnet(bed, source):
    """A host on the connector's egress network routes packets to the client's overlay
    address via the connector, with a mapped real address or a transit IP as source."""
    # Make WEB4 a mapped real address of the client first.
    r = bed.curl("client", "http://example.com/")
    assert r.returncode == 0, r.stderr
    counter = Counter(bed, "client", CLIENT.overlay4, 9999)
    inet = bed.ns["inet"]
    inet.run("ip", "route", "replace", "100.64.0.0/10", "via", CONN1.link4)
    nft0 = nft_drops(bed)
    try:
        script = textwrap.dedent(f"""
            from scapy.all import IP, UDP, send
            send(IP(src="{source}", dst="{CLIENT.overlay4}") / UDP(sport=80, dport=9999)
                 / b"x", count=200, verbose=0)
        """)
        r = bed.run("inet", sys.executable, "-c", script, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: nft_drops(bed) >= nft0 + 200, 15, "conn1's table to drop 200 packets")
    finally:
        inet.run("ip", "route", "del", "100.64.0.0/10", check=False)
    assert counter.close() == 0


def nft_drops(bed: Testbed) -> int:
    doc = json.loads(bed.run("conn1", "nft", "-j", "list", "table", "inet",
                             "conn25d_conn25", check=True).stdout)
    return sum(e["counter"]["packets"] for item in doc["nftables"]
               for e in item.get("rule", {}).get("expr", []) if "counter" in e)


def test_another_nodes_dns_queries_get_nothing(bed):
    """A node sends DNS queries to the client's listen address as overlay packets: no
    answer, no magic IP spent."""
    def in_use() -> int:
        return bed.status("client")["client"]["pools"]["v4Magic"]["inUse"]

    used, before = in_use(), datapath(bed, "client")
    query = ('IP(src="{0}", dst="100.100.100.100") / UDP(sport=5353, dport=53) / '
             'DNS(rd=1, qd=DNSQR(qname="q{1}.wild.example.com"))')
    for i in range(20):
        send_overlay(bed, "peer", "client", query.format(SPEC["peer"].overlay4, i), 1)
    grew(bed, "client", "drop_dst_not_allowed", 20, before)
    assert in_use() == used


def download(bed: Testbed, host: str, out: Path, pace: int) -> subprocess.Popen:
    """A download of SIZE bytes through the connector that the server paces (so the
    client sends nothing but acknowledgements of what it received)."""
    return bed.ns["client"].popen(
        "curl", "-sS", "-4", "-m", "90", "-o", str(out),
        "-w", "%{size_download}", f"http://{host}/bytes/{SIZE}?pace={pace}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("restarted", ["client", "conn1"])
def test_a_download_in_flight_survives_a_crash_and_restart(bed, restarted, tmp_path):
    """SIGKILL and restart one end while a 4 MB download runs: it completes. The side
    that restarted has no flow for the return direction; the return packets re-create
    it (solo.example.com resolves to an address of its own, so the connector's mapping
    names one transit IP)."""
    out = tmp_path / "download"
    curl = download(bed, "solo.example.com", out, 400_000)
    try:
        wait_for(lambda: out.exists() and out.stat().st_size >= 1_000_000, 30,
                 "the first megabyte")
        bed.stop(restarted, sig=signal.SIGKILL)
        bed.start(restarted)
        stdout, stderr = curl.communicate(timeout=90)
    finally:
        stop(curl)
    assert curl.returncode == 0, stderr
    assert int(stdout) == SIZE == out.stat().st_size
    assert datapath(bed, restarted)["flows_from_return"] >= 1
    if restarted == "conn1":
        assert SOLO4 in json.dumps(bed.status("conn1")["connector"])


def test_a_download_whose_address_several_names_share_survives_a_connector_crash(
        bed, tmp_path):
    """Several names resolve to WEB4, so the client has several transit IPs mapped to it
    and a return packet cannot say which: the connector saves such flows (within its
    5 s sweep) and restores them at start."""
    for host in ("example.com", "www.example.com", "shared.wild.example.com"):
        assert bed.curl("client", f"http://{host}/").returncode == 0
    out = tmp_path / "download"
    curl = download(bed, "shared.wild.example.com", out, 200_000)
    saved = bed.state_dir("conn1") / "flows.bin"
    try:
        wait_for(lambda: out.exists() and out.stat().st_size >= 500_000, 30,
                 "the first half megabyte")
        wait_for(lambda: saved.exists() and saved.stat().st_size > 8, 15,
                 "conn1 to save the flow")
        bed.stop("conn1", sig=signal.SIGKILL)
        bed.start("conn1")
        stdout, stderr = curl.communicate(timeout=90)
    finally:
        stop(curl)
    assert curl.returncode == 0, stderr
    assert int(stdout) == SIZE == out.stat().st_size
    m = re.search(r"restored (\d+) connector flows", bed.log("conn1"))
    assert m and int(m.group(1)) >= 1, bed.log("conn1")[-3000:]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def log_lines(bed: Testbed, node: str) -> int:
    return len(bed.log(node).splitlines())


def refusals(bed: Testbed, node: str, name: str) -> int:
    return bed.status(node)["metrics"].get(f"refusals_{name}", 0)


def test_a_flood_of_forged_rejects_writes_a_few_log_lines(bed):
    """20,000 rejects from a peer's endpoint: all counted, a few lines logged."""
    lines, before = log_lines(bed, "client"), refusals(bed, "client", "reject_received")
    script = textwrap.dedent(f"""
        import ipaddress, socket
        from conn25.fastpath import Datapath
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("{SPEC['peer'].endpoint}", 41641))
        for i in range(20000):
            t = ipaddress.ip_address("169.254.128.0") + 1000 + i % 5000
            s.sendto(Datapath.reject_datagram(t), ("{CLIENT.endpoint}", 41641))
    """)
    r = bed.run("peer", sys.executable, "-c", script, timeout=60)
    assert r.returncode == 0, r.stderr

    def settled() -> bool:
        # The socket may drop some of a burst and the event ring overflow (counted as
        # events_dropped): every reject that arrived is an event handled or dropped.
        dp = datapath(bed, "client")
        handled = refusals(bed, "client", "reject_received") - before
        return dp["rejects_received"] >= 15000 and \
            handled + dp["events_dropped"] >= dp["rejects_received"]

    wait_for(settled, 20, "the rejects to be counted")
    assert refusals(bed, "client", "reject_received") - before >= 4000
    assert log_lines(bed, "client") - lines <= 5, bed.log("client")[-3000:]


def test_a_megabyte_of_refused_transit_items_writes_a_few_log_lines(bed):
    """One request of some 12,000 items the connector refuses (destinations no app
    resolved, and the per-peer rate): one result each, a few log lines."""
    lines = log_lines(bed, "conn1")
    script = textwrap.dedent(f"""
        import ipaddress, json, trio
        from conn25.daemon.http import request
        items = []
        body = b""
        i = 0
        while True:
            items.append({{"transitIP": str(ipaddress.ip_address("169.254.200.0") + i),
                           "destinationIP": "203.0.113.200", "app": "Example"}})
            i += 1
            if i % 500 == 0:
                body = json.dumps({{"transitIPs": items}}).encode()
                if len(body) > 1_000_000:
                    break
        status, answer = trio.run(lambda: request(
            "{CONN1.overlay4}", 41642, "POST", "/v0/connector/transit-ip", body, timeout=20))
        codes = [r["code"] for r in json.loads(answer)["transitIPs"]]
        print(status, len(items), len(codes), sorted(set(codes)))
    """)
    r = bed.run("client", sys.executable, "-c", script, timeout=60)
    assert r.returncode == 0, r.stderr
    status, sent, answered, codes = r.stdout.split(" ", 3)
    assert status == "200" and int(sent) == int(answered) > 10000, r.stdout
    assert codes.strip() == "[1]", r.stdout
    assert log_lines(bed, "conn1") - lines <= 5, bed.log("conn1")[-3000:]
