"""What a node forwards, tried as an attacker would, and flows across restarts.

In namespaces this module creates (conn25.lab.testbed): a connector is not a router
for tailnet members, nothing from the internet enters the tailnet through it, a
node's DNS server answers no other node, and a download in flight completes
across a SIGKILL and restart of the client and of the connector. Crafted inner
packets are sealed by conn25.lab.wgmember with a node's own key (its conn25d
stopped, from its endpoint): a WireGuard session with a tailnet key is the
identity on the overlay. Replayed, altered and unagreed datagrams and spoofed
inner sources are dropped and counted, and nothing of them reaches the
internet; on the underlay there is nothing but WireGuard.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, TCP, UDP

from conn25.lab.capture import Capture
from conn25.lab.netns import wait_for
from conn25.lab.testbed import (
    DEFAULT_NODES,
    PAGE_PATTERN,
    SOLO4,
    WEB4,
    Testbed,
    pattern_page,
)
from conn25.lab.wgmember import WgMember, speaking_for

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


def datapath(bed: Testbed, node: str) -> dict:
    doc = bed.status(node)
    assert doc is not None, f"{node} does not answer"
    return doc["datapath"]


def grew(bed: Testbed, node: str, counter: str, by: int, before: dict) -> None:
    wait_for(lambda: datapath(bed, node)[counter] >= before[counter] + by, 15,
             f"{node}'s {counter} to grow by {by}")


@pytest.mark.parametrize("attacker", ["blocked", "client"])
def test_a_member_cannot_use_the_connector_as_a_router(bed, attacker):
    """Raw packets to an internet host that no app resolved, sealed under a live session
    with the connector by a node the policy refuses every app and by an allowed client:
    none leaves the connector."""
    counter = Counter(bed, "inet", WEB4, 9999)
    before = datapath(bed, "conn1")
    try:
        with speaking_for(bed, attacker, "conn1") as member:
            me = SPEC[attacker].overlay4
            member.send_packets(bytes(IP(src=me, dst=WEB4) / UDP(sport=4000, dport=9999)
                                      / b"x"), 1000)
            member.send_packets(bytes(IP(src=me, dst=WEB4)
                                      / TCP(sport=4000, dport=80, flags="S")), 100)
            grew(bed, "conn1", "drop_dst_not_allowed", 1100, before)
    finally:
        arrived = counter.close()
    assert arrived == 0
    after = datapath(bed, "conn1")
    assert after["translated"] == before["translated"]
    # They authenticated: not counted as anything a forger could cause.
    assert (after["drop_auth"], after["drop_spoofed"]) == (before["drop_auth"],
                                                           before["drop_spoofed"])


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
    """A node sends DNS queries to the client's listen address inside its own session with
    the client: no answer comes back in the tunnel, no magic IP is spent."""
    def in_use() -> int:
        return bed.status("client")["client"]["pools"]["v4Magic"]["inUse"]

    used, before = in_use(), datapath(bed, "client")
    me = SPEC["peer"].overlay4
    with speaking_for(bed, "peer", "client") as member:
        for i in range(20):
            member.send_packets(bytes(
                IP(src=me, dst="100.100.100.100") / UDP(sport=5353, dport=53)
                / DNS(rd=1, qd=DNSQR(qname=f"q{i}.wild.example.com"))))
        grew(bed, "client", "drop_dst_not_allowed", 20, before)
        # An answer would have been sent as the query was handled, before the count above;
        # a second more covers a slow machine.
        answers = [p for p in member.received(1.0)
                   if IP(p).haslayer(UDP) and IP(p)[UDP].sport == 53]
    assert answers == []
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


def reject(src: str, dst: str, transit: ipaddress.IPv4Address) -> bytes:
    """A connector's reject as it travels in the tunnel: protocol 253, family, transit IP."""
    return bytes(IP(src=src, dst=dst, proto=253) / (b"\x04" + transit.packed))


def peer_drops(bed: Testbed, node: str, peer: str) -> dict[str, int]:
    """The per-peer drops `node`'s status shows for `peer`."""
    doc = bed.status(node)
    assert doc is not None, f"{node} does not answer"
    [entry] = [p for p in doc["peers"] if p["name"] == peer]
    return entry["drops"]


FLOOD = 20000


@pytest.mark.parametrize("claimed", ["own", "connector"])
def test_a_flood_of_forged_rejects_writes_a_few_log_lines(bed, claimed):
    """20,000 rejects sealed by a member that is not the connector (peer), naming transit
    IPs no app assigned, with the connector's address or the member's own as their source.
    The first fail the inner source check, the second the check that a reject comes from
    the peer its transit IP is registered with: all dropped as spoofed, none handled;
    counted, a few lines logged."""
    lines, before = log_lines(bed, "client"), refusals(bed, "client", "reject_received")
    dp0, drops0 = datapath(bed, "client"), peer_drops(bed, "client", "peer")
    src = CONN1.overlay4 if claimed == "connector" else SPEC["peer"].overlay4
    with speaking_for(bed, "peer", "client") as member:
        for i in range(FLOOD):
            transit = ipaddress.IPv4Address("169.254.128.0") + 1000 + i % 5000
            member.send(member.seal(reject(src, CLIENT.overlay4, transit)))
        # The socket may drop some of a burst; what arrived authenticated and was refused,
        # on the counter and on the peer's line.
        wait_for(lambda: datapath(bed, "client")["drop_spoofed"]
                 >= dp0["drop_spoofed"] + FLOOD * 3 // 4, 20, "the rejects to be dropped")
        dp = datapath(bed, "client")
        assert dp["rejects_received"] == dp0["rejects_received"]
        assert refusals(bed, "client", "reject_received") == before
        assert peer_drops(bed, "client", "peer")["spoofed"] - drops0["spoofed"] == \
            dp["drop_spoofed"] - dp0["drop_spoofed"]
    assert log_lines(bed, "client") - lines <= 5, bed.log("client")[-3000:]


def test_a_reject_from_a_member_that_is_not_the_connector_is_not_believed(bed):
    """A member that is not the client's connector names a transit IP the client registered
    with conn1: the client must not take it as conn1's reject (and re-register)."""
    assert bed.curl("client", "http://example.com/").returncode == 0
    transit = ipaddress.IPv4Address(client_transit(bed, "example.com.", WEB4))
    before = datapath(bed, "client")
    rx0 = peer_line(bed, "client", "peer")["rxBytes"]
    with speaking_for(bed, "peer", "client") as member:
        member.send(member.seal(reject(SPEC["peer"].overlay4, CLIENT.overlay4, transit)))
        # Handled once the client counted the datagram's bytes on the peer's line.
        wait_for(lambda: peer_line(bed, "client", "peer")["rxBytes"] > rx0 + 32, 15,
                 "the client to receive the reject")
        after = datapath(bed, "client")
    assert after["rejects_received"] == before["rejects_received"]
    assert after["drop_spoofed"] == before["drop_spoofed"] + 1


def peer_line(bed: Testbed, node: str, peer: str) -> dict:
    doc = bed.status(node)
    assert doc is not None, f"{node} does not answer"
    [entry] = [p for p in doc["peers"] if p["name"] == peer]
    return entry


def client_transit(bed: Testbed, domain: str, real: str) -> str:
    """The transit IP of the client's assignment for (domain, real)."""
    for app in bed.status("client")["client"]["apps"]:
        for d in app["domains"]:
            for a in d["addresses"]:
                if d["domain"] == domain and a["real"] == real:
                    return a["transit"]
    raise AssertionError(f"the client has no assignment for {domain} -> {real}")


# What a datagram that must not count is, and the datapath counter and per-peer drop
# reason it must land in.
ATTACKS = {
    "replayed": ("drop_replay", "replay"),
    "flipped_bit": ("drop_auth", "auth"),
    "spoofed_source": ("drop_spoofed", "spoofed"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_datagram_that_does_not_count_is_dropped_and_reaches_nothing(bed, attack):
    """The client's key and session with conn1, a UDP packet to a transit IP conn1 maps
    for the client: sent once as it is, it reaches the server (so the path works); sent
    again verbatim, with one bit flipped, or with another member's inner source, it is
    dropped, counted under its reason (datapath and the client's peer line at conn1) and
    never reaches the server."""
    assert bed.curl("client", "http://example.com/").returncode == 0
    transit = client_transit(bed, "example.com.", WEB4)
    counter_name, reason = ATTACKS[attack]
    counter = Counter(bed, "inet", WEB4, 9999)
    try:
        with speaking_for(bed, "client", "conn1") as member:
            packet = bytes(IP(src=CLIENT.overlay4, dst=transit) / UDP(sport=4001, dport=9999)
                           / b"conn25d")
            before, drops0 = datapath(bed, "conn1"), peer_drops(bed, "conn1", "client")
            valid = member.seal(packet)
            member.send(valid)
            grew(bed, "conn1", "translated", 1, before)
            if attack == "replayed":
                member.send(valid)
            elif attack == "flipped_bit":
                member.send(WgMember.flipped(member.seal(packet)))
            else:
                member.send(member.seal(bytes(
                    IP(src=SPEC["peer"].overlay4, dst=transit) / UDP(sport=4001, dport=9999)
                    / b"conn25d")))
            grew(bed, "conn1", counter_name, 1, before)
            after = datapath(bed, "conn1")
            assert peer_drops(bed, "conn1", "client")[reason] == drops0[reason] + 1
    finally:
        arrived = counter.close()
    assert arrived == 1
    assert after["translated"] == before["translated"] + 1
    assert after[counter_name] == before[counter_name] + 1


def test_a_key_the_tailnet_does_not_list_gets_no_session(bed):
    """An initiation under a key the tailnet file does not list: refused (counted in the
    metrics and the refusals), never answered; transport data under a key no handshake
    agreed, to a transit IP conn1 maps for the client: dropped, counted, reaches nothing."""
    assert bed.curl("client", "http://example.com/").returncode == 0
    transit = client_transit(bed, "example.com.", WEB4)

    def metrics() -> dict:
        return bed.status("conn1")["metrics"]

    m0, before = metrics(), datapath(bed, "conn1")
    counter = Counter(bed, "inet", WEB4, 9999)
    try:
        with WgMember.stranger(bed.ns["client"], bed.tailnet_path, "conn1",
                               (CLIENT.link4, 0)) as stranger:
            assert not stranger.handshake(timeout=3)
            wait_for(lambda: metrics().get("wireguard_handshakes_rejected", 0)
                     > m0.get("wireguard_handshakes_rejected", 0), 15,
                     "conn1 to refuse the handshake")
            assert stranger.received(0.5) == [] and stranger.ignored == 0
            assert stranger.peer.current is None
            stranger.send(WgMember.unagreed(bytes(
                IP(src=CLIENT.overlay4, dst=transit) / UDP(sport=4002, dport=9999) / b"x")))
            grew(bed, "conn1", "drop_unknown_index", 1, before)
    finally:
        arrived = counter.close()
    assert arrived == 0
    assert metrics()["refusals_handshake_rejected"] > m0["refusals_handshake_rejected"]
    assert datapath(bed, "conn1")["translated"] == before["translated"]


def test_the_underlay_carries_only_wireguard_and_none_of_a_page(bed):
    """A page fetched through the connector: on the client's link (up0) it is nowhere in
    clear, and the datagrams between the client's and conn1's endpoints are WireGuard
    messages, transport data (type 4) among them, both ways. On conn1's link on the
    internet side (i2) the page is in clear, as the server sent it: the search finds it
    where it is."""
    size = 100_000
    page = pattern_page(size)
    # Every 32 bytes of the page are one of these (it repeats PAGE_PATTERN).
    windows = {page[i:i + 32] for i in range(len(PAGE_PATTERN))}
    url = f"http://underlay.wild.example.com/pattern/{size}"
    assert bed.curl("client", "http://underlay.wild.example.com/").returncode == 0
    with Capture(bed.ns["client"], "up0") as up0, \
            Capture(bed.ns["inet"], f"i{CONN1.index}") as i2:
        r = bed.curl("client", url)
        up0.stop()
        i2.stop()
    assert r.returncode == 0 and r.stdout.encode() == page, r.stderr
    assert up0.complete() and i2.complete(), (up0, up0.dropped, i2, i2.dropped)
    assert i2.find(windows), "the page is not in clear even where it is: the search is blind"
    assert not up0.find(windows | {b"GET /pattern/"})
    ends = {(CLIENT.endpoint, 41641), (CONN1.endpoint, 41641)}
    overlay = [u for u in up0.udp() if {u.src, u.dst} == ends]
    assert all(u.payload[:1] in b"\x01\x02\x03\x04" and u.payload[1:4] == b"\0\0\0"
               for u in overlay), [u.payload[:4] for u in overlay][:20]
    transport = [u for u in overlay if u.payload[0] == 4]
    assert any(u.outgoing for u in transport) and any(not u.outgoing for u in transport)
    # The page crossed up0 inside them (at least its size, sealed).
    assert sum(len(u.payload) for u in transport if not u.outgoing) >= size


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
