"""System set-up (conn25.daemon.system): the TUN device, addresses, MTU, routes, the
connector's forwarding sysctls and nftables table, their removal, and crash
leftovers not blocking a restart; the routes into the TUN are exactly the magic
pools and the peers.

The code under test runs in a driver process inside a namespace that each test
creates (pyroute2, nft and /proc/sys act on the caller's namespace); the test
checks the result with ``ip -j``, ``nft -j`` and /proc/sys in that namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from conn25.daemon.system import (
    RT_PROTO,
    SystemSetup,
    SystemSetupError,
    nft_table_name,
    replace_file,
)
from conn25.lab.netns import Netns, link, wait_for

TUN = "conn25"
ADDR4, ADDR6, DNS = "100.64.0.1", "fd7a:115c:a1e0::1", "100.100.100.100"
PEER4, PEER6 = "100.64.0.2", "fd7a:115c:a1e0::2"
MAGIC4, MAGIC6 = "100.80.0.0/16", "fd7a:115c:a1e0:ab12::/64"
EGRESS4, EGRESS6 = "198.51.100.1", "2001:db8:1::1"
SERVER4, SERVER6 = "198.51.100.10", "2001:db8:1::10"
FWD4, FWD6 = "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"
LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"

# Runs in the namespace: one JSON command per stdin line, one JSON reply per stdout line.
DRIVER = r"""
import ipaddress, json, os, select, sys
from conn25.daemon.system import SystemSetup, leftovers

s = None
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        if op == "new":
            s = SystemSetup(**cmd)
            value = None
        elif op == "open":
            value = s.open([ipaddress.ip_address(a) for a in cmd["addresses"]],
                           [ipaddress.ip_network(n) for n in cmd["routes"]],
                           [ipaddress.ip_address(a) for a in cmd.get("local", [])],
                           connector=cmd.get("connector", False))
        elif op == "set_routes":
            value = s.set_routes([ipaddress.ip_network(n) for n in cmd["routes"]])
        elif op == "routes":
            value = [str(n) for n in s.routes()]
        elif op == "connector":
            value = s.enable_connector()
        elif op == "blockers":
            value = s.forward_blockers()
        elif op == "close":
            value = s.close()
        elif op == "offload":
            value = s.offload
        elif op == "leftovers":
            value = leftovers(cmd["tun"])
        elif op == "echo":
            # Write one packet into the TUN (as the datapath would: behind a zero
            # virtio-net header) and return the first UDP packet the kernel routes back.
            hdr = bytes(10 if s.vnet_hdr else 0)
            os.write(s.fd, hdr + bytes.fromhex(cmd["packet"]))
            value = None
            while value is None:
                if not select.select([s.fd], [], [], 10)[0]:
                    raise TimeoutError("no UDP packet came back through the TUN")
                p = os.read(s.fd, 65535)[len(hdr):]
                if (p[0] >> 4 == 4 and p[9] == 17) or (p[0] >> 4 == 6 and p[6] == 17):
                    value = p.hex()
        elif op == "inject":
            # Write one packet into the TUN, as the datapath would.
            os.write(s.fd, bytes(10 if s.vnet_hdr else 0) + bytes.fromhex(cmd["packet"]))
            value = None
        elif op == "pending":
            # How many UDP packets wait in the TUN now (without waiting for more;
            # the kernel's own IPv6 neighbour discovery is not counted).
            value = 0
            while select.select([s.fd], [], [], 0)[0]:
                p = os.read(s.fd, 65535)[10 if s.vnet_hdr else 0:]
                value += (p[0] >> 4 == 4 and p[9] == 17) or (p[0] >> 4 == 6 and p[6] == 17)
        reply = {"ok": True, "value": value}
    except Exception as e:
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), flush=True)
"""

# Echoes to every UDP datagram the source address it saw.
ECHO_SERVER = r"""
import select, socket, sys
socks = []
for family, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((addr, 9999))
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(2048)
        s.sendto(peer[0].encode(), peer)
"""


class Driver:
    """SystemSetup in a process of its own inside ``ns``."""

    def __init__(self, ns: Netns, **kw: object) -> None:
        self.ns = ns
        self.proc = ns.popen(sys.executable, "-c", DRIVER, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.call("new", tun_name=TUN, **kw)

    def send(self, op: str, **kw: object) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], 30)[0]:
            raise AssertionError(f"driver did not answer {op!r}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"driver died on {op!r}: {self.proc.communicate()[1]}")
        return json.loads(line)

    def call(self, op: str, **kw: object) -> object:
        reply = self.send(op, **kw)
        assert reply["ok"], f"{op} failed: {reply['error']}"
        return reply["value"]

    def error(self, op: str, **kw: object) -> str:
        reply = self.send(op, **kw)
        assert not reply["ok"], f"{op} should have failed"
        return reply["error"]

    def kill9(self) -> None:
        """Kill it; return once its TUN went with it (the nft table and sysctls stay)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        wait_for(lambda: not any(lk["ifname"] == TUN for lk in ip_json(self.ns, "link", "show")),
                 10, "the TUN of the killed process to disappear")


def open_default(d: Driver, routes: tuple[str, ...] = (MAGIC4, MAGIC6, f"{PEER4}/32",
                                                       f"{PEER6}/128"),
                 connector: bool = False) -> int:
    return d.call("open", addresses=[ADDR4, ADDR6], routes=list(routes), local=[DNS],
                  connector=connector)


def ip_json(ns: Netns, *args: str) -> list[dict]:
    out = ns.run("ip", "-j", *args).stdout
    return json.loads(out) if out.strip() else []


def our_routes(ns: Netns) -> set[str]:
    """Routes with conn25d's protocol number in every table, as 'dst dev'."""
    found = set()
    for fam in ("-4", "-6"):
        for r in ip_json(ns, fam, "route", "show", "table", "all", "proto", str(RT_PROTO)):
            dst = r["dst"] if "/" in r["dst"] else str(ipaddress.ip_network(r["dst"]))
            found.add(f"{dst} {r.get('dev')}")
    return found


def nft_tables(ns: Netns) -> set[tuple[str, str]]:
    items = json.loads(ns.run("nft", "-j", "list", "tables").stdout)["nftables"]
    return {(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i}


def read(ns: Netns, path: str) -> str:
    return ns.run("cat", path).stdout.strip()


def assert_nothing_left(ns: Netns) -> None:
    assert not any(lk["ifname"] == TUN for lk in ip_json(ns, "link", "show")), "TUN left"
    assert our_routes(ns) == set()
    rules = [r for fam in ("-4", "-6") for r in ip_json(ns, fam, "rule", "show")
             if r.get("protocol") == str(RT_PROTO)]
    assert rules == []
    assert ("inet", nft_table_name(TUN)) not in nft_tables(ns)


@pytest.fixture
def ns() -> Iterator[Netns]:
    n = Netns("sys")
    try:
        yield n
    finally:
        n.close()


# -- without root: input checks before anything is touched ---------------------


@pytest.mark.parametrize("name", ["", "x" * 16, "a b", 'a"b', "a/b", 5])
def test_bad_tun_name_is_rejected(name):
    with pytest.raises(ValueError, match="bad TUN device name"):
        SystemSetup(tun_name=name)


@pytest.mark.parametrize("mtu", [575, 65536, "1420", 1420.0])
def test_bad_mtu_is_rejected(mtu):
    with pytest.raises(ValueError, match="bad MTU"):
        SystemSetup(mtu=mtu)


@pytest.mark.parametrize("mark", [0, 3, 1 << 32, -1])
def test_masquerade_mark_must_be_one_bit(mark):
    with pytest.raises(ValueError, match="masquerade mark"):
        SystemSetup(masq_mark=mark)


def test_bad_open_arguments_fail_before_touching_the_system():
    s = SystemSetup()
    with pytest.raises(ValueError, match="not an IP address"):
        s.open(["100.64.0.1"], [])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not an IP network"):
        s.open([ipaddress.ip_address(ADDR4)], [ipaddress.ip_address(PEER4)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="below IPv6's minimum"):
        SystemSetup(mtu=1200).open([ipaddress.ip_address(ADDR6)], [])
    assert s.fd is None and s.index is None


@pytest.mark.parametrize("queues", [0, 17, "2", True, 2.0])
def test_bad_number_of_tun_queues_is_rejected(queues):
    with pytest.raises(ValueError, match="bad number of TUN queues"):
        SystemSetup(tun_queues=queues)


def test_route_changes_need_an_open_device_and_close_is_a_no_op_before_open():
    s = SystemSetup()
    with pytest.raises(SystemSetupError, match="not open"):
        s.set_routes([])
    with pytest.raises(SystemSetupError, match="not open"):
        s.enable_connector()
    s.close()
    s.close()


def test_table_name_is_per_tun_and_a_valid_nft_identifier():
    assert nft_table_name("conn25") == "conn25d_conn25"
    assert nft_table_name("c25-a") == "conn25d_c25_a"


# -- root, in a namespace of the test's own ------------------------------------


def test_replace_file_writes_bytes_or_pieces_whole(tmp_path):
    """A state file is written through a temporary file, from one piece or many."""
    path = tmp_path / "state.json"
    replace_file(path, b"[1]")
    assert path.read_bytes() == b"[1]"
    replace_file(path, iter([b"[", b"1,", b"2", b"]"]))
    assert path.read_bytes() == b"[1,2]"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.root
def test_open_sets_mtu_link_addresses_and_routes_and_close_removes_all(ns):
    """The magic pools (and every peer's overlay address) route into the TUN."""
    d = Driver(ns, mtu=1420)
    fd = open_default(d)
    assert isinstance(fd, int) and fd >= 0

    [dev] = ip_json(ns, "addr", "show", "dev", TUN)
    assert dev["mtu"] == 1420
    assert "UP" in dev["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in dev["addr_info"]}
    assert addrs == {(ADDR4, 32), (ADDR6, 128), (DNS, 32)}  # no fe80:: of its own
    v6 = next(a for a in dev["addr_info"] if a["local"] == ADDR6)
    assert v6.get("nodad") and not v6.get("tentative")  # usable at once
    assert our_routes(ns) == {f"{MAGIC4} {TUN}", f"{MAGIC6} {TUN}", f"{PEER4}/32 {TUN}",
                              f"{PEER6}/128 {TUN}"}
    # The kernel routes to those destinations through the TUN.
    got = ip_json(ns, "route", "get", "100.80.1.2")[0]
    assert got["dev"] == TUN

    d.call("close")
    assert_nothing_left(ns)
    d.call("close")  # idempotent
    assert d.call("leftovers", tun=TUN) == []


def tun_queue_fds(pid: int) -> int:
    """How many fds of process `pid` are queues of our TUN (fdinfo's iff line)."""
    found = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            found += f"iff:\t{TUN}\n" in info.read_text()
    return found


@pytest.mark.root
def test_open_makes_a_multi_queue_tun_with_offloads_and_close_removes_it(ns):
    """--tun-queues 2: one device, multi-queue, one fd per queue in the opening process,
    offloads on; closing removes the device."""
    d = Driver(ns, tun_queues=2, tun_offload=True)
    open_default(d)
    [dev] = ip_json(ns, "-d", "link", "show", "dev", TUN)
    assert dev["linkinfo"]["info_data"].get("multi_queue") is True
    assert tun_queue_fds(d.proc.pid) == 2
    assert d.call("offload") != "off"
    d.call("close")
    assert tun_queue_fds(d.proc.pid) == 0
    assert_nothing_left(ns)


@pytest.fixture
def routed_elsewhere(ns: Netns) -> Iterator[str]:
    """A prefix that ``ns`` already routes through a veth to another namespace."""
    other = Netns("othr")
    try:
        link(ns, "203.0.113.1/24", other, "203.0.113.2/24")
        yield "203.0.113.0/24"
    finally:
        other.close()


@pytest.mark.root
def test_set_routes_replaces_the_set_and_keeps_it_when_an_add_fails(ns, routed_elsewhere):
    d = Driver(ns)
    open_default(d, routes=(MAGIC4, f"{PEER4}/32"))
    # A route of someone else's on our TUN (another protocol) is not ours to remove.
    ns.run("ip", "route", "add", "10.1.0.0/16", "dev", TUN)

    d.call("set_routes", routes=[f"{PEER4}/32", "100.64.0.3/32", MAGIC6])
    kept = {f"{PEER4}/32 {TUN}", f"100.64.0.3/32 {TUN}", f"{MAGIC6} {TUN}"}
    assert our_routes(ns) == kept
    assert sorted(d.call("routes")) == sorted([f"{PEER4}/32", "100.64.0.3/32", MAGIC6])
    assert any(r["dst"] == "10.1.0.0/16" for r in ip_json(ns, "route", "show"))

    # The prefix is already routed through the veth: that add fails and the set stays.
    err = d.error("set_routes", routes=[f"{PEER4}/32", "100.64.0.4/32", routed_elsewhere])
    assert f"adding route {routed_elsewhere} via conn25 failed: File exists" in err
    assert our_routes(ns) == kept

    d.call("set_routes", routes=[])
    assert our_routes(ns) == set()
    d.call("close")
    assert_nothing_left(ns)


@pytest.fixture
def internet(ns: Netns) -> Iterator[Netns]:
    """An 'internet' namespace behind a veth, with a UDP server that echoes the
    source address it sees; forwarding in ``ns`` starts off."""
    inet = Netns("inet")
    try:
        link(ns, f"{EGRESS4}/24", inet, f"{SERVER4}/24")
        veth = next(lk["ifname"] for lk in ip_json(ns, "link", "show") if lk["ifname"] != "lo")
        iveth = next(lk["ifname"] for lk in ip_json(inet, "link", "show") if lk["ifname"] != "lo")
        ns.run("ip", "addr", "add", f"{EGRESS6}/64", "dev", veth, "nodad")
        inet.run("ip", "addr", "add", f"{SERVER6}/64", "dev", iveth, "nodad")
        for key in ("net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"):
            ns.run("sysctl", "-qw", key)
        srv = inet.popen(sys.executable, "-c", ECHO_SERVER, SERVER4, SERVER6,
                         stdout=subprocess.PIPE, text=True)
        assert select.select([srv.stdout], [], [], 20)[0] and srv.stdout.readline() == "ready\n"
        yield inet
    finally:
        inet.close()


def udp_packet(src: str, dst: str) -> str:
    l3 = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    return bytes(l3 / UDP(sport=40000, dport=9999) / b"hello").hex()


@pytest.mark.root
def test_connector_forwards_and_masquerades_then_restores_everything(ns, internet):
    d = Driver(ns)
    open_default(d)
    assert (read(ns, FWD4), read(ns, FWD6)) == ("0", "0")
    ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_be_liberal=0")
    d.call("connector")
    assert (read(ns, FWD4), read(ns, FWD6), read(ns, LIBERAL)) == ("1", "1", "1")
    assert ("inet", "conn25d_conn25") in nft_tables(ns)
    d.call("connector")  # twice is harmless

    # A peer's packet from the TUN leaves with the egress address as its source, and
    # the answer is un-NATed back into the TUN to the peer.
    for peer, server, egress, layer in ((PEER4, SERVER4, EGRESS4, IP),
                                        (PEER6, SERVER6, EGRESS6, IPv6)):
        reply = layer(bytes.fromhex(d.call("echo", packet=udp_packet(peer, server))))
        assert (reply.src, reply.dst) == (server, peer)
        assert bytes(reply[UDP].payload).decode() == egress

    d.call("close")
    assert (read(ns, FWD4), read(ns, FWD6), read(ns, LIBERAL)) == ("0", "0", "0")
    assert_nothing_left(ns)


def nft_drops_into_tun(ns: Netns) -> int:
    """Packets our table dropped on their way into the TUN."""
    table = json.loads(ns.run("nft", "-j", "list", "table", "inet", "conn25d_conn25").stdout)
    total = 0
    for item in table["nftables"]:
        expr = item.get("rule", {}).get("expr", [])
        if any(e.get("match", {}).get("left", {}).get("meta", {}).get("key") == "oifname"
               for e in expr) and any("drop" in e for e in expr):
            total += sum(e["counter"]["packets"] for e in expr if "counter" in e)
    return total


@pytest.mark.root
def test_connector_table_lets_nothing_from_outside_into_the_tun(ns, internet):
    """Second belt: a host on the egress network cannot route packets into the tailnet
    through the connector, not even with a source the connector has translated for."""
    d = Driver(ns)
    open_default(d)
    d.call("connector")
    internet.run("ip", "route", "add", "100.64.0.0/10", "via", EGRESS4)
    internet.run("ip", "-6", "route", "add", "fd7a:115c:a1e0::/48", "via", EGRESS6)
    assert d.call("pending") == 0
    send = ("import socket, sys\n"
            "for a, f in ((sys.argv[1], socket.AF_INET), (sys.argv[2], socket.AF_INET6)):\n"
            "    s = socket.socket(f, socket.SOCK_DGRAM)\n"
            "    for _ in range(20): s.sendto(b'forged', (a, 9999))\n")
    internet.run(sys.executable, "-c", send, PEER4, PEER6, check=True)
    wait_for(lambda: nft_drops_into_tun(ns) >= 40, 10, "the table to drop 40 packets")
    assert d.call("pending") == 0
    # a masqueraded connection's replies still come back in
    reply = IP(bytes.fromhex(d.call("echo", packet=udp_packet(PEER4, SERVER4))))
    assert (reply.src, reply.dst) == (SERVER4, PEER4)
    d.call("close")
    assert_nothing_left(ns)


@pytest.mark.root
def test_forward_blockers_name_other_tables_dropping_forwarded_traffic(ns):
    d = Driver(ns)
    open_default(d)
    d.call("connector")
    assert d.call("blockers") == []
    ns.run("nft", "add table ip filter; "
           "add chain ip filter FORWARD { type filter hook forward priority 0; policy drop; }")
    [b] = d.call("blockers")
    assert "ip filter FORWARD has policy drop" in b and 'iifname "conn25"' in b
    d.call("close")
    # Only our table goes; the administrator's stays.
    assert ("ip", "filter") in nft_tables(ns)
    assert_nothing_left(ns)


@pytest.mark.root
def test_restart_after_kill9_removes_leftovers_and_restores_original_sysctls(ns, tmp_path):
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    crashed = Driver(ns, state_dir=str(tmp_path))
    open_default(crashed)
    crashed.call("connector")
    crashed.kill9()
    # The TUN went with the process; the nft table and the sysctl did not.
    assert ("inet", "conn25d_conn25") in nft_tables(ns)
    assert read(ns, FWD4) == "1"
    assert list(tmp_path.iterdir()) != []

    d = Driver(ns, state_dir=str(tmp_path))
    assert d.call("leftovers", tun=TUN) == ["nftables table inet conn25d_conn25"]
    open_default(d)
    assert ("inet", "conn25d_conn25") not in nft_tables(ns)  # the leftover is gone
    d.call("connector")
    assert ("inet", "conn25d_conn25") in nft_tables(ns)
    d.call("close")
    # Restored to what was there before the crashed run, not the 1 it left behind.
    assert read(ns, FWD4) == "0"
    assert list(tmp_path.iterdir()) == []
    assert_nothing_left(ns)


# In the internet namespace: waits for one datagram on port 9998, says so, and answers
# its sender once told to (a line on stdin), however long after.
LATE_ANSWER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9998))
print("ready", flush=True)
data, peer = s.recvfrom(2048)
print("got", flush=True)
sys.stdin.readline()
s.sendto(b"late", peer)
"""


@pytest.mark.root
def test_a_connector_restarted_after_kill9_still_unnats_the_replies_of_its_connections(
        ns, internet, tmp_path):
    """The table a killed connector left stays until the restarted one replaces it: with no
    NAT chain at all, the kernel would take a reply to a connection the killed run
    masqueraded as its own and answer it with a reset (or a port unreachable)."""
    late = internet.popen(sys.executable, "-c", LATE_ANSWER, SERVER4, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([late.stdout], [], [], 20)[0] and late.stdout.readline() == "ready\n"
        crashed = Driver(ns, state_dir=str(tmp_path))
        open_default(crashed, connector=True)
        crashed.call("connector")
        out = IP(src=PEER4, dst=SERVER4) / UDP(sport=40000, dport=9998) / b"first"
        crashed.call("inject", packet=bytes(out).hex())
        assert select.select([late.stdout], [], [], 20)[0] and late.stdout.readline() == "got\n"
        crashed.kill9()

        d = Driver(ns, state_dir=str(tmp_path))
        open_default(d, connector=True)
        assert ("inet", "conn25d_conn25") in nft_tables(ns)  # kept, to be replaced
        late.stdin.write("go\n")
        late.stdin.flush()
        # The answer to the killed run's connection comes into the new TUN, un-NATed.
        wait_for(lambda: d.call("pending") == 1, 10, "the late answer in the TUN")
        d.call("connector")
        assert ("inet", "conn25d_conn25") in nft_tables(ns)
        d.call("close")
        assert_nothing_left(ns)
    finally:
        late.kill()
        late.wait()


@pytest.mark.root
def test_a_connector_that_crashes_before_enabling_removes_the_table_it_kept(ns, tmp_path):
    crashed = Driver(ns, state_dir=str(tmp_path))
    open_default(crashed, connector=True)
    crashed.call("connector")
    crashed.kill9()
    d = Driver(ns, state_dir=str(tmp_path))
    open_default(d, connector=True)
    assert ("inet", "conn25d_conn25") in nft_tables(ns)
    d.call("close")  # before enable_connector: the kept table goes too
    assert_nothing_left(ns)


@pytest.mark.root
def test_open_replaces_a_stale_persistent_tun(ns):
    ns.run("ip", "tuntap", "add", "dev", TUN, "mode", "tun")
    ns.run("ip", "addr", "add", "10.99.0.1/32", "dev", TUN)
    d = Driver(ns)
    open_default(d)
    [dev] = ip_json(ns, "-d", "addr", "show", "dev", TUN)
    assert dev["linkinfo"]["info_data"]["persist"] is False
    assert "10.99.0.1" not in {a["local"] for a in dev["addr_info"]}
    d.call("close")
    assert_nothing_left(ns)


@pytest.mark.root
def test_open_refuses_a_tun_held_by_a_live_process_and_other_devices_of_the_name(ns):
    first = Driver(ns)
    open_default(first)
    second = Driver(ns)
    err = second.error("open", addresses=["100.64.0.9"], routes=[])
    assert "TUN device conn25 is in use by another process" in err
    [dev] = ip_json(ns, "addr", "show", "dev", TUN)  # the first node's device is untouched
    assert ADDR4 in {a["local"] for a in dev["addr_info"]}
    assert our_routes(ns)
    first.call("close")
    assert_nothing_left(ns)

    ns.run("ip", "link", "add", TUN, "type", "veth", "peer", "name", "c25peer")
    err = second.error("open", addresses=["100.64.0.9"], routes=[])
    assert "exists and is not a TUN device (kind veth)" in err
    assert any(lk["ifname"] == TUN for lk in ip_json(ns, "link", "show"))


def assert_failed_open_left_nothing(ns: Netns, d: Driver, err: str) -> None:
    assert err.startswith("SystemSetupError: ")
    assert_nothing_left(ns)
    # The same object opens again when asked for something that can succeed.
    d.call("open", addresses=[ADDR4], routes=[MAGIC4])
    d.call("close")
    assert_nothing_left(ns)


@pytest.mark.root
def test_open_failing_at_an_address_leaves_nothing_and_says_which(ns):
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    d = Driver(ns)
    err = d.error("open", addresses=[ADDR4, ADDR6], routes=[MAGIC4], local=[DNS])
    assert "adding address fd7a:115c:a1e0::1/128 to conn25 failed: Permission" in err
    assert "disable_ipv6" in err
    assert_failed_open_left_nothing(ns, d, err)


@pytest.mark.root
def test_open_failing_at_a_route_leaves_nothing_and_says_which(ns, routed_elsewhere):
    d = Driver(ns)
    err = d.error("open", addresses=[ADDR4, ADDR6], routes=[MAGIC4, routed_elsewhere],
                  local=[DNS])
    assert f"adding route {routed_elsewhere} via conn25 failed: File exists" in err
    assert_failed_open_left_nothing(ns, d, err)


@pytest.mark.root
def test_failed_enable_connector_changes_nothing_and_a_client_needs_no_nft(ns):
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    d = Driver(ns, nft="/nonexistent/nft")
    open_default(d)  # a client works without nft
    err = d.error("connector")
    assert "installing nftables table inet conn25d_conn25 failed" in err
    assert "/nonexistent/nft" in err
    assert read(ns, FWD4) == "0"
    d.call("close")
    assert read(ns, FWD4) == "0"
    assert_nothing_left(ns)

