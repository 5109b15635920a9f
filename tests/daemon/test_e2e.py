"""conn25d end to end, in network namespaces this module creates (conn25.lab.testbed).

A client, two connectors for the app "Example" (example.com, *.example.com), a plain
peer and a blocked client, all running the real `conn25d up`; an "internet" namespace
with dnsmasq, a web server that says which address it saw, and iperf3. Real curl,
ping and iperf3. Every bound is stated where it is waited for.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest
from scapy.layers.inet import IP, UDP

from conn25.lab.netns import wait_for
from conn25.lab.resolved import unavailable as resolved_unavailable
from conn25.lab.testbed import DEFAULT_NODES, ORIGINAL_RESOLV_CONF, WEB4, WEB6, Testbed
from conn25.lab.wgmember import WgMember, speaking_for

pytestmark = pytest.mark.root

SPEC = {n.name: n for n in DEFAULT_NODES}
CONN1, CONN2, CLIENT = SPEC["conn1"], SPEC["conn2"], SPEC["client"]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with Testbed.serving(tmp_path_factory.mktemp("testbed"),
                         ("conn1", "conn2", "peer", "client")) as tb:
        yield tb


def came_from(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"curl failed ({r.returncode}): {r.stderr}"
    return seen_from(r.stdout)


def seen_from(answer: str) -> str:
    """The address the web server says it saw."""
    m = re.search(r"you came from (\S+)", answer)
    assert m, answer
    return m.group(1)


def resolve(bed: Testbed, name: str, host: str, family: int = 4) -> str:
    r = bed.run(name, sys.executable, "-c",
                f"import socket; print(socket.getaddrinfo({host!r}, 80, socket.AF_INET"
                f"{'6' if family == 6 else ''}, socket.SOCK_STREAM)[0][4][0])")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def client_assignment(bed: Testbed, magic: str) -> dict:
    doc = bed.status("client")
    for app in doc["client"]["apps"]:
        for domain in app["domains"]:
            for a in domain["addresses"]:
                if a["magic"] == magic:
                    return a
    raise AssertionError(f"no assignment for {magic} in {doc}")


def test_app_domain_goes_through_the_connector_and_other_names_go_direct(bed):
    """1: the server sees the connector's egress address; a non-app name goes direct."""
    magic = resolve(bed, "client", "example.com")
    assert ipaddress.ip_address(magic) in ipaddress.ip_network("100.80.0.0/16")
    assert came_from(bed.curl("client", "http://example.com/")) == CONN1.link4
    assert resolve(bed, "client", "direct.example.net") == WEB4
    assert came_from(bed.curl("client", "http://direct.example.net/")) == CLIENT.link4


def test_ipv6_works_the_same_way(bed):
    """2."""
    magic = resolve(bed, "client", "example.com", family=6)
    assert ipaddress.ip_address(magic) in ipaddress.ip_network("fd7a:115c:a1e0:ab12::/64")
    assert came_from(bed.curl("client", "http://example.com/", "-6")) == CONN1.link6


def test_cname_chain_and_wildcard_subdomain(bed):
    """3."""
    for host in ("www.example.com", "a.wild.example.com"):
        magic = resolve(bed, "client", host)
        assert ipaddress.ip_address(magic) in ipaddress.ip_network("100.80.0.0/16"), host
        assert came_from(bed.curl("client", f"http://{host}/")) == CONN1.link4


def test_magic_ip_without_assignment_fails_at_once(bed):
    """4: ICMP unreachable, not a timeout (curl's exit 7, not 28)."""
    r = bed.curl("client", "http://100.80.255.250/")
    assert r.returncode == 7, (r.returncode, r.stderr)


# One connection from the client's namespace to HOST, port 80, from source port PORT (0:
# the kernel's choice): prints how often its SYN was sent again (tcp_info's
# tcpi_total_retrans, read before any data, when only the SYN can have gone twice), then
# the server's answer. Per connection, unlike the namespace's counters, which also count
# the daemons' own connections.
FIRST_CONNECTION = """
import socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
addr = socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4]
s = socket.socket()
s.settimeout(10)
s.bind(("", port))
s.connect(addr)
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
print(struct.unpack_from("I", info, 100)[0])
s.sendall(b"GET / HTTP/1.0\\r\\nHost: " + host.encode() + b"\\r\\n\\r\\n")
sys.stdout.write(b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace"))
"""


def first_connection(bed: Testbed, host: str, port: int = 0) -> tuple[int, str]:
    """(SYNs sent again, the address the server saw) for one connection to `host`."""
    r = bed.run("client", sys.executable, "-c", FIRST_CONNECTION, host, str(port))
    assert r.returncode == 0, r.stderr
    retransmitted, _, answer = r.stdout.partition("\n")
    return int(retransmitted), seen_from(answer)


def test_first_connection_after_the_answer_needs_no_retransmission(bed):
    """5: the answer comes after the connector's ack, so the first SYN is not dropped."""
    for i in range(5):
        assert first_connection(bed, f"first{i}.wild.example.com") == (0, CONN1.link4)


def test_a_source_port_reused_toward_another_name_of_the_same_server_is_not_refused(bed):
    """Two names of one server are two transit IPs but one tuple after the connector's
    NAT, when the client reuses its source port (its kernel may: the magic IPs differ).
    The server holds the first connection in TIME_WAIT (it closed first) and its
    timestamps, which the client counts from a base per destination; were the second
    masqueraded to the same port, the server would answer its SYN with the old ACK and
    the client would reset and send the SYN again, as half of these pairs did."""
    for k in range(8):
        port = 21000 + k  # below the ephemeral range: used by nothing else here
        for name in (f"reuse{k}a.wild.example.com", f"reuse{k}b.wild.example.com"):
            assert first_connection(bed, name, port) == (0, CONN1.link4), name


def test_a_fresh_name_costs_one_request_to_the_connector(bed):
    """The resolution carries transit offers and the connector maps the answer onto them:
    no registration follows, and the first connection to the answer still gets through
    without a retransmission."""
    before = bed.status("client")["metrics"]
    names = [f"once{i}.wild.example.com" for i in range(5)]
    magics = [resolve(bed, "client", name) for name in names]
    after = bed.status("client")["metrics"]
    for key, per_name in (("registration_resolves", 1), ("registration_requests", 0),
                          ("dns_mapped_in_resolution", 1)):
        assert after[key] - before[key] == per_name * len(names), key
    for magic in magics:
        assert first_connection(bed, magic) == (0, CONN1.link4)


def test_status_shows_the_assignment_while_a_connection_is_open(bed):
    """10 and 13: status --json during a 5 s iperf3 stream, which ends without error."""
    magic = resolve(bed, "client", "iperf.wild.example.com")
    proc = bed.ns["client"].popen("iperf3", "-c", magic, "-t", "5", "-J",
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = wait_for(lambda: (lambda a: a if a["activeFlows"] >= 1 else None)(
        client_assignment(bed, magic)), 10, "an active flow in status")
    assert (a["app"], a["domain"], a["real"]) == ("Example", "iperf.wild.example.com.", WEB4)
    assert ipaddress.ip_address(a["transit"]) in ipaddress.ip_network("169.254.0.0/16")
    table = subprocess.run([sys.executable, "-m", "conn25", "status", "--state-dir",
                            str(bed.state_dir("client"))], capture_output=True, text=True,
                           timeout=15)
    assert table.returncode == 0 and magic in table.stdout and a["transit"] in table.stdout
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err + out
    assert '"error"' not in out


def test_metrics_in_prometheus_text_format(bed):
    """The local API's /metrics: datapath and control-plane counters, pool gauges."""
    import trio

    from conn25.daemon.http import request_unix

    came_from(bed.curl("client", "http://metrics.wild.example.com/"))
    sock = str(bed.state_dir("client") / "conn25d.sock")
    status, body = trio.run(lambda: request_unix(sock, "GET", "/metrics", timeout=5))
    text = body.decode()
    assert status == 200
    translated = re.search(r"^conn25d_datapath_translated_total (\S+)$", text, re.M)
    assert translated and float(translated.group(1)) > 0, text[:2000]
    assert re.search(r"^# TYPE conn25d_pool_v4Magic_in_use gauge$", text, re.M), text[:2000]


def test_datagrams_from_unknown_keys_or_spoofed_sources_are_dropped(bed):
    """9: counted on the connector. A key the tailnet does not list gets no handshake and
    its data no session; a member (peer, its conn25d stopped) with a live session that
    puts another member's address in the inner source is dropped as spoofed, on the
    datapath counter and on that member's peer line."""
    before = bed.status("conn1")
    inner = bytes(IP(src=CLIENT.overlay4, dst=CONN1.overlay4) / UDP(sport=4000, dport=9))
    with WgMember.stranger(bed.ns["client"], bed.tailnet_path, "conn1",
                           (CLIENT.link4, 0)) as stranger:
        assert not stranger.handshake(timeout=3)
        stranger.send(WgMember.unagreed(inner))
    with speaking_for(bed, "peer", "conn1") as member:
        member.send(member.seal(bytes(IP(src=CLIENT.overlay4, dst=CONN1.overlay4)
                                      / UDP(sport=4000, dport=9))))
        after = wait_for(lambda: (lambda d: d if d["datapath"]["drop_spoofed"]
                                  > before["datapath"]["drop_spoofed"] else None)(
            bed.status("conn1")), 15, "the spoofed datagram to be counted")
    assert after["datapath"]["drop_unknown_index"] > before["datapath"]["drop_unknown_index"]
    assert after["metrics"]["wireguard_handshakes_rejected"] > \
        before["metrics"].get("wireguard_handshakes_rejected", 0)

    def spoofed(doc: dict) -> int:
        return next(p["drops"]["spoofed"] for p in doc["peers"] if p["name"] == "peer")

    assert spoofed(after) == spoofed(before) + 1


def test_blocked_client_gets_no_app(bed):
    """8: the ACL does not let mallory reach autogroup:internet: its DNS answer for an
    app name is SERVFAIL, a registration it makes itself gets the permission code (6),
    and the connector holds no mapping for it, so its packets to transit IPs are dropped."""
    bed.start("blocked")
    try:
        r = bed.curl("blocked", "http://example.com/")
        assert r.returncode == 6, (r.returncode, r.stderr)  # could not resolve: SERVFAIL
        script = textwrap.dedent(f"""
            import json, trio
            from conn25.daemon.http import request
            body = json.dumps({{"transitIPs": [{{"transitIP": "169.254.128.77",
                               "destinationIP": "{WEB4}", "app": "Example"}}]}}).encode()
            status, answer = trio.run(lambda: request(
                "{CONN1.overlay4}", 41642, "POST", "/v0/connector/transit-ip", body, timeout=5))
            print(answer.decode())
        """)
        r = bed.run("blocked", sys.executable, "-c", script)
        assert r.returncode == 0, r.stderr
        assert [item["code"] for item in json.loads(r.stdout)["transitIPs"]] == [6]
        peers = bed.status("conn1")["connector"].get("peers", [])
        assert not any(p["name"] == "blocked" for p in peers), peers
    finally:
        assert bed.stop("blocked") == 0


def test_restarted_connector_works_again_within_2_seconds(bed):
    """6: reject -> re-registration."""
    magic = resolve(bed, "client", "restart.wild.example.com")
    assert came_from(bed.curl("client", f"http://{magic}/")) == CONN1.link4
    assert bed.stop("conn1") == 0
    bed.start("conn1")
    r = bed.curl("client", f"http://{magic}/", "--retry", "4", "--retry-delay", "0",
                 "--retry-all-errors", "-m", "2")
    assert came_from(r) == CONN1.link4


def test_restarted_client_keeps_its_magic_ips(bed):
    """14: a name resolved before the restart connects through its old magic IP."""
    magic = resolve(bed, "client", "keep.wild.example.com")
    assert bed.stop("client") == 0
    bed.start("client")
    assert came_from(bed.curl("client", f"http://{magic}/")) == CONN1.link4


def test_failover_to_the_second_connector(bed):
    """7: with conn1 gone, new connections use conn2 within 15 s (health interval plus
    re-registration)."""
    assert bed.stop("conn1") == 0
    try:
        wait_for(lambda: bed.curl("client", "http://failover.wild.example.com/", "-m", "3")
                 .stdout.strip() == f"you came from {CONN2.link4}", 15,
                 "a connection through conn2")
    finally:
        bed.start("conn1")


def test_a_crashed_node_restarts_cleanly(bed):
    """A SIGKILLed connector leaves its nftables table, socket file and sysctls behind;
    the next start clears them and serves."""
    bed.stop("conn2", sig=signal.SIGKILL)
    assert "conn25d_conn25" in bed.run("conn2", "nft", "list", "tables").stdout
    bed.start("conn2")
    assert bed.status("conn2")["advertiseConnector"] is True


def test_reload_rejects_a_bad_file_and_applies_a_good_one(bed):
    """A bad tailnet file is logged and the running configuration stays; a good one
    (and SIGHUP) is applied."""
    path = bed.tailnet_path
    good = path.read_text()

    def reloads(name: str) -> tuple[int, int]:
        m = bed.status(name)["metrics"]
        return m["reloads"], m["reload_errors"]

    ok0, bad0 = reloads("client")
    try:
        path.write_text(good.replace('"nodes"', '"nodez"'))
        wait_for(lambda: reloads("client")[1] > bad0, 10, "the bad file to be rejected")
        # (whichever connector is chosen after the failover tests)
        assert came_from(bed.curl("client", "http://reload.wild.example.com/")) in (
            CONN1.link4, CONN2.link4)
    finally:
        path.write_text(good)
    wait_for(lambda: reloads("client")[0] > ok0, 10, "the good file to be applied")
    ok1 = reloads("client")[0]
    bed.procs["client"].send_signal(signal.SIGHUP)
    wait_for(lambda: reloads("client")[0] > ok1, 10, "a reload on SIGHUP")
    assert "rejected, keeping the running configuration" in bed.log("client")


def getent(bed: Testbed, name: str, host: str) -> str:
    """The first address `getent hosts` gives in namespace `name`: the system's resolver
    (nsswitch, /etc/resolv.conf), as any program there uses it."""
    r = bed.run(name, "getent", "hosts", host)
    assert r.returncode == 0, (r.returncode, r.stderr)
    return r.stdout.split()[0]


def test_accept_dns_points_the_system_at_the_node_and_puts_it_back(bed):
    """up --accept-dns (the default for a client): `getent hosts` answers an app name
    with a magic IP with no DNS step of our own; after SIGTERM, and after a SIGKILL and
    the restart that follows, resolv.conf is byte for byte the original again."""
    resolv = bed.resolv_conf("client")
    # getent hosts asks for IPv6 first: a magic IP of either family.
    magic = (ipaddress.ip_network("100.80.0.0/16"), ipaddress.ip_network(
        "fd7a:115c:a1e0:ab12::/64"))
    real = {WEB4, WEB6}
    original = ORIGINAL_RESOLV_CONF.encode()
    mode = resolv.stat().st_mode

    def is_magic(host: str) -> bool:
        return any(ipaddress.ip_address(getent(bed, "client", host)) in net for net in magic)

    assert resolv.read_bytes().startswith(b"# Generated by conn25d")
    assert is_magic("accept.wild.example.com")
    assert getent(bed, "client", "direct.example.net") in real  # via the original's upstream
    assert bed.status("client")["dns"] == {"mode": "resolv.conf", "path": str(resolv),
                                           "server": "100.100.100.100"}
    assert bed.stop("client") == 0
    assert resolv.read_bytes() == original and resolv.stat().st_mode == mode
    assert getent(bed, "client", "accept.wild.example.com") in real  # the system's own path
    bed.start("client")
    assert is_magic("accept.wild.example.com")
    bed.stop("client", sig=signal.SIGKILL)
    assert resolv.read_bytes().startswith(b"# Generated by conn25d")  # a crash leaves ours
    bed.start("client")  # restores the original, reads its upstreams, writes ours again
    assert is_magic("accept.wild.example.com")
    assert getent(bed, "client", "direct.example.net") in real
    assert "did not restore" in bed.log("client")
    assert bed.stop("client") == 0
    assert resolv.read_bytes() == original and resolv.stat().st_mode == mode
    bed.start("client")


def test_a_connector_leaves_the_system_s_dns_alone(bed):
    """--accept-dns is on only for a node that sees apps."""
    assert bed.resolv_conf("conn1").read_bytes() == ORIGINAL_RESOLV_CONF.encode()


RESOLVED_CHECKS = textwrap.dedent("""
    import json, subprocess, sys
    from conn25.lab.netns import terminate, wait_for
    up, state, log = json.loads(sys.argv[1]), sys.argv[2], open(sys.argv[3], "w")
    def sh(*args):
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout
    def status():
        r = subprocess.run([sys.executable, "-m", "conn25", "status", "--json", "--state-dir",
                            state], capture_output=True, text=True, timeout=15)
        return json.loads(r.stdout) if r.returncode == 0 else None
    out = {"resolv_conf": open("/etc/resolv.conf").read()}
    node = subprocess.Popen(up, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: node.poll() is not None or status() is not None, 20, "conn25d")
        out["dns"] = status()["dns"]
        out["link"] = sh("resolvectl", "domain", "conn25") + sh("resolvectl", "dns", "conn25")
        out["app"] = sh("getent", "hosts", "example.com")
        before = status()["metrics"]
        out["other"] = sh("getent", "hosts", "direct.example.net")
        after = status()["metrics"]
        out["forwarded"] = after["dns_forwarder_upstream_queries"] - before[
            "dns_forwarder_upstream_queries"]
        sh("resolvectl", "domain", "conn25", "")  # cleared behind the node's back...
        out["cleared"] = sh("resolvectl", "domain", "conn25")
        node.send_signal(1)  # ...and set again on SIGHUP
        wait_for(lambda: status()["metrics"]["reloads"] > after["reloads"], 10, "a reload")
        out["reloaded"] = sh("resolvectl", "domain", "conn25")
    finally:
        out["rc"] = terminate(node, 15, 15)
    out["after"] = sh("resolvectl", "--no-pager", "status")
    out["resolv_conf_after"] = open("/etc/resolv.conf").read()
    print(json.dumps(out))
""")


@pytest.mark.skipif(resolved_unavailable() is not None, reason=str(resolved_unavailable()))
def test_accept_dns_with_a_real_systemd_resolved(bed, tmp_path):
    """Where systemd-resolved owns /etc/resolv.conf (its stub), up --accept-dns gives the
    TUN link the DNS server and the app domains as routing-only domains: `getent hosts`
    answers an app name with a magic IP, other names go resolved's own way (not one
    reaches conn25d), the domains are set again on SIGHUP and nothing stays on exit.
    A real resolved, with a D-Bus of its own, in a mount namespace of the peer's
    network namespace (conn25.lab.resolved)."""
    assert bed.stop("peer") == 0
    try:
        up = [sys.executable, "-m", "conn25", "up", "--tailnet", str(bed.tailnet_path),
              "--hostname", "peer", "--state-dir", str(bed.state_dir("peer")),
              "--log-level", "debug"]
        r = bed.run("peer", "unshare", "--mount", "--propagation", "private", sys.executable,
                    "-m", "conn25.lab.resolved", "198.51.100.53", "--", sys.executable, "-c",
                    RESOLVED_CHECKS, json.dumps(up), str(bed.state_dir("peer")),
                    str(tmp_path / "peer.log"), timeout=120)
        log = (tmp_path / "peer.log").read_text() if (tmp_path / "peer.log").exists() else ""
        assert r.returncode == 0, r.stderr + log
        out = json.loads(r.stdout.splitlines()[-1])
        assert "managed by man:systemd-resolved" in out["resolv_conf"]
        assert out["dns"] == {"mode": "systemd-resolved", "server": "100.100.100.100"}, log
        assert "~example.com" in out["link"] and "100.100.100.100" in out["link"]
        address = ipaddress.ip_address(out["app"].split()[0])
        assert any(address in ipaddress.ip_network(n) for n in (
            "100.80.0.0/16", "fd7a:115c:a1e0:ab12::/64")), out["app"]
        assert out["other"].split()[0] in (WEB4, WEB6) and out["forwarded"] == 0
        assert "~example.com" not in out["cleared"] and "~example.com" in out["reloaded"]
        assert out["rc"] == 0 and " ERROR " not in log, log  # resolvectl revert included
        assert "conn25" not in out["after"] and out["resolv_conf_after"] == out["resolv_conf"]
    finally:
        bed.start("peer")


def test_embedded_node_serves_and_leaves_nothing_behind(bed, tmp_path):
    """11: a node inside another trio program's nursery; no socket of it stays open either
    (its forwarder keeps upstream sockets between queries)."""
    script = textwrap.dedent(f"""
        import os, socket, trio
        from conn25.daemon.node import Node, NodeOptions
        from conn25.daemon.system import leftovers
        def sockets():
            fds = os.listdir("/proc/self/fd")
            return sum(os.readlink(f"/proc/self/fd/{{fd}}").startswith("socket:") for fd in fds
                       if os.path.lexists(f"/proc/self/fd/{{fd}}"))
        async def main():
            silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an upstream
            silent.bind(("127.0.0.1", 0))
            before = sockets()
            node = Node(NodeOptions(tailnet={str(bed.tailnet_path)!r}, hostname="peer",
                                    state_dir={str(tmp_path)!r},
                                    private_key={str(bed.private_key_path("peer"))!r},
                                    upstream_dns=(silent.getsockname(),)))
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                assert leftovers("conn25"), "nothing set up?"
                with trio.move_on_after(0.2):  # x.test A, on a socket the forwarder keeps
                    await node.forwarder.forward(
                        bytes.fromhex("123401000001000000000000017804746573740000010001"))
                nursery.cancel_scope.cancel()
            assert leftovers("conn25") == [], leftovers("conn25")
            assert sockets() == before, (sockets(), before)
            print("ok")
        trio.run(main)
    """)
    assert bed.stop("peer") == 0
    try:
        r = bed.run("peer", sys.executable, "-c", script, timeout=60)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    finally:
        bed.start("peer")


def test_nothing_remains_after_every_node_stops(bed):
    """12 (runs last in this module: it stops every node)."""
    for name in list(bed.procs):
        assert bed.stop(name) == 0, bed.log(name)[-2000:]
    for name in ("client", "conn1", "conn2", "peer"):
        r = bed.run(name, sys.executable, "-c",
                    "from conn25.daemon.system import leftovers; print(leftovers('conn25'))")
        assert r.stdout.strip() == "[]", (name, r.stdout, r.stderr)
        # Every resolver configuration as the testbed wrote it (--accept-dns undone).
        assert bed.resolv_conf(name).read_text() == ORIGINAL_RESOLV_CONF, name
        assert not list(bed.state_dir(name).glob("resolv.conf*")), name
