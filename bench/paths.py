"""The network benchmark's namespaces and the four paths measured through them.

    client ns  ==veth==  middle ns (the connector)  ==veth==  server ns ("internet")
    192.0.2.1/24         192.0.2.2/24 | 203.0.113.10/30        203.0.113.9/30; on lo:
                                                               198.51.100.10 (web, iperf3)
                                                               198.51.100.53 (dnsmasq)

The client has no route to the server of its own: each path, set up and torn down
by `Bench.path`, adds what it needs, so only one path exists at a time:

    kernel        client routes 198.51.100.0/24 via the middle, which forwards
    kernel_nat    client routes a virtual IP via the middle, which DNATs it to the
                  server and masquerades (nftables)
    conn25d       `conn25d up` on the client and, as connector, on the middle; names
                  resolve through the client's conn25d to magic IPs
    wireguard_go  a wireguard-go tunnel client <-> middle, kernel routing beyond
    conn25d_offload, conn25d_queues   conn25d with --tun-offload, and with --tun-queues 2
                  as well (two queues, two pump pairs per node)

Only documentation and reserved addresses; the namespaces reach nothing but each other. Built on
conn25.lab.testbed.Testbed (its start/stop/status/close), with this topology instead of
the test tailnet's; close() removes everything, also after a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from conn25.lab.netns import Netns, sh, terminate, wait_for
from conn25.lab.testbed import (
    APP_TAG,
    DNS4,
    WEB4,
    NodeSpec,
    Testbed,
    start_servers,
    tailnet_file,
)

CLIENT = NodeSpec("client", 1, user="alice@example.com")
CONNECTOR = NodeSpec("connector", 2, tags=(APP_TAG,), connector=True)
SERVER_NET = "198.51.100.0/24"
VIP = "100.80.0.1"  # path kernel_nat's virtual IP (conn25d's magic pool: never up at once)
MAGIC_NET = ipaddress.ip_network("100.80.0.0/16")
WG_CLIENT, WG_MIDDLE, WG_PORT = "100.64.200.1", "100.64.200.2", 51820
QUAD100 = "100.100.100.100"
NAT_TABLE = "c25bench_nat"

# n<i>.<domain> resolves, through the path's DNS, to the path's target (dnsmasq wildcards);
# only the conn25d path's domain is an app domain (the tailnet's *.example.com).
# conn25d_offload's and conn25d_queues' names are apps' too, but not conn25d's: each path's
# first names are fresh.
DOMAINS = {"kernel": "direct.example.net", "kernel_nat": "nat.example.net",
           "conn25d": "app.example.com", "wireguard_go": "wg.example.net",
           "conn25d_offload": "app2.example.com", "conn25d_queues": "app3.example.com"}
LABELS = {"kernel": "(a) kernel routing", "kernel_nat": "(b) kernel NAT (nftables)",
          "conn25d": "(c) conn25d --tun-offload=false", "wireguard_go": "(d) wireguard-go",
          "conn25d_offload": "(e) conn25d (TUN offloads on, the default)",
          "conn25d_queues": "(f) conn25d --tun-queues 2 (TUN offloads on)"}
# conn25d's flags on both nodes, per conn25d path: (c) reads packet by packet, (e) with the
# TUN offloads (the default), (f) with them on two TUN queues.
CONN25D_FLAGS = {"conn25d": ("--tun-offload=false",), "conn25d_offload": ("--tun-offload=true",),
                 "conn25d_queues": ("--tun-offload=true", "--tun-queues", "2")}
PATHS = tuple(LABELS)


def wireguard_missing() -> str | None:
    """Why path wireguard_go cannot run here, or None."""
    missing = [t for t in ("wireguard-go", "wg") if shutil.which(t) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


@dataclasses.dataclass(frozen=True)
class BenchPath:
    key: str
    target: str  # the address iperf3 and ping go to
    domain: str
    pids: tuple[int, ...] = ()  # the userspace processes doing the path's work

    @property
    def label(self) -> str:
        return LABELS[self.key]


class Bench(Testbed):
    """The three namespaces, dnsmasq, the web server and iperf3 on the server."""

    node_dns = False  # each path sets the client's resolver itself (_resolver)

    def __init__(self, workdir: Path) -> None:
        self._wg: list[tuple[subprocess.Popen, str]] = []
        super().__init__(workdir, (CLIENT, CONNECTOR))

    @property
    def client(self) -> Netns:
        return self.ns[CLIENT.name]

    @property
    def middle(self) -> Netns:
        return self.ns[CONNECTOR.name]

    @property
    def server(self) -> Netns:
        return self.ns["server"]

    # -- building (overrides Testbed's) ------------------------------------------

    def _build(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tailnet_path = self.workdir / "tailnet.hujson"
        self.tailnet_path.write_text(tailnet_file((CLIENT, CONNECTOR)))
        for key in (CLIENT.name, CONNECTOR.name, "server"):
            self.ns[key] = Netns(key)
        self._underlay()
        # Interface names are known so the NAT path can name the egress one.
        self._veth(self.middle, "up0", f"{CONNECTOR.link4}/30",
                   self.server, "dn0", f"{CONNECTOR.gw4}/30")
        self.middle.run("ip", "route", "add", SERVER_NET, "via", CONNECTOR.gw4)
        for addr in (WEB4, DNS4):
            self.server.run("ip", "addr", "add", f"{addr}/32", "dev", "lo")
        self.server.run("ip", "route", "add", "default", "via", CONNECTOR.link4)
        etc = Path("/etc/netns") / self.client.name
        etc.mkdir(parents=True, exist_ok=True)
        self._etc.append(etc)
        self._forwarding(False)
        self._start_servers()

    def _underlay(self) -> None:
        """The link between client and middle (bench/wan.py's goes through a delay line)."""
        self._veth(self.client, "up0", f"{CLIENT.endpoint}/24",
                   self.middle, "dn0", f"{CONNECTOR.endpoint}/24")

    @staticmethod
    def _veth(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str) -> None:
        sh("ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if,
           "netns", b.name)
        for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            ns.run("ip", "addr", "add", addr, "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")

    def _start_servers(self) -> None:
        start_servers(self.server, self.workdir, (
            "--cache-size=0", f"--address=/example.com/{WEB4}", f"--address=/example.net/{WEB4}",
            f"--address=/{DOMAINS['kernel_nat']}/{VIP}"))

    # -- helpers -------------------------------------------------------------------

    def _forwarding(self, on: bool) -> None:
        self.middle.run("sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}")

    def _resolver(self, nameserver: str) -> None:
        """The client's resolv.conf (bind-mounted by `ip netns exec` at each exec)."""
        (Path("/etc/netns") / self.client.name / "resolv.conf").write_text(
            f"nameserver {nameserver}\noptions timeout:2 attempts:2\n")

    def resolve(self, name: str) -> str:
        """The first IPv4 address of `name` as the client's resolver answers it."""
        r = self.client.run(sys.executable, "-c",
                            "import socket, sys; print(socket.getaddrinfo(sys.argv[1], 80, "
                            "socket.AF_INET, socket.SOCK_STREAM)[0][4][0])", name,
                            check=False, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"resolving {name} on the client failed: {r.stderr.strip()}")
        return r.stdout.strip()

    # -- the paths -------------------------------------------------------------------

    @contextlib.contextmanager
    def path(self, key: str) -> Iterator[BenchPath]:
        """Set up path `key`, yield it, and take it down again (also on failure)."""
        setup = {"kernel": self._kernel, "kernel_nat": self._kernel_nat,
                 "conn25d": self._conn25d, "wireguard_go": self._wireguard,
                 "conn25d_offload": lambda: self._conn25d("conn25d_offload"),
                 "conn25d_queues": lambda: self._conn25d("conn25d_queues")}[key]
        with setup() as p:
            yield p

    @contextlib.contextmanager
    def _kernel(self) -> Iterator[BenchPath]:
        self._forwarding(True)
        self._resolver(DNS4)
        self.client.run("ip", "route", "add", SERVER_NET, "via", CONNECTOR.endpoint)
        try:
            yield BenchPath("kernel", WEB4, DOMAINS["kernel"])
        finally:
            self.client.run("ip", "route", "del", SERVER_NET, check=False)
            self._forwarding(False)

    @contextlib.contextmanager
    def _kernel_nat(self) -> Iterator[BenchPath]:
        rules = self.workdir / "nat.nft"
        rules.write_text(f"""
table ip {NAT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {VIP} dnat to {WEB4}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "up0" masquerade
    }}
}}
""")
        self._forwarding(True)
        self._resolver(DNS4)
        try:
            self.middle.run("nft", "-f", str(rules))
            # Only the virtual IP and the DNS server: the server itself is not routed.
            for dst in (VIP, DNS4):
                self.client.run("ip", "route", "add", f"{dst}/32", "via", CONNECTOR.endpoint)
            yield BenchPath("kernel_nat", VIP, DOMAINS["kernel_nat"])
        finally:
            for dst in (VIP, DNS4):
                self.client.run("ip", "route", "del", f"{dst}/32", check=False)
            self.middle.run("nft", "delete", "table", "ip", NAT_TABLE, check=False)
            self._forwarding(False)

    @contextlib.contextmanager
    def _conn25d(self, key: str = "conn25d") -> Iterator[BenchPath]:
        self._resolver(QUAD100)
        flags = CONN25D_FLAGS[key]
        try:
            # The default log level, as a user runs it (Testbed.start's debug is overridden).
            procs = [self.start(n.name, "--log-level", "info", *flags)
                     for n in (CONNECTOR, CLIENT)]
            # The first answer may wait for the client's first health check of the connector.
            magic = wait_for(lambda: self._try_resolve(f"iperf.{DOMAINS[key]}"), 20,
                             "the client's conn25d to answer for an app name")
            if ipaddress.ip_address(magic) not in MAGIC_NET:
                raise RuntimeError(f"app name resolved to {magic}, not a magic IP")
            yield BenchPath(key, str(magic), DOMAINS[key], tuple(p.pid for p in procs))
        finally:
            for name in (CLIENT.name, CONNECTOR.name):
                if name in self.procs and (rc := self.stop(name)) != 0:
                    print(f"conn25d on {name} exited with {rc}", file=sys.stderr)

    def _try_resolve(self, name: str) -> str | None:
        try:
            return self.resolve(name)
        except RuntimeError:
            return None

    @contextlib.contextmanager
    def _wireguard(self) -> Iterator[BenchPath]:
        if (why := wireguard_missing()) is not None:
            raise RuntimeError(why)
        self._forwarding(True)
        self._resolver(DNS4)
        tag = os.getpid() % 100000
        try:
            keys = {}
            for side in ("c", "m"):
                priv = sh("wg", "genkey").stdout.strip()
                pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True,
                                     text=True, check=True, timeout=10).stdout.strip()
                keyfile = self.workdir / f"wg-{side}.key"
                keyfile.touch(mode=0o600)
                keyfile.write_text(priv + "\n")
                keys[side] = (keyfile, pub)
            ends = ((self.client, "c", WG_CLIENT, "m", CONNECTOR.endpoint, SERVER_NET),
                    (self.middle, "m", WG_MIDDLE, "c", CLIENT.endpoint, f"{WG_CLIENT}/32"))
            pids = []
            for ns, side, addr, other, peer_ep, allowed in ends:
                ifname = f"c25wg{tag}{side}"
                pids.append(self._wg_start(ns, ifname))
                ns.run("wg", "set", ifname, "private-key", str(keys[side][0]),
                       "listen-port", str(WG_PORT), "peer", keys[other][1],
                       "allowed-ips", allowed,
                       "endpoint", f"{peer_ep}:{WG_PORT}")
                ns.run("ip", "addr", "add", f"{addr}/24", "dev", ifname)
                ns.run("ip", "link", "set", ifname, "up")
            self.client.run("ip", "route", "add", SERVER_NET, "dev", f"c25wg{tag}c")
            yield BenchPath("wireguard_go", WEB4, DOMAINS["wireguard_go"], tuple(pids))
        finally:
            self.client.run("ip", "route", "del", SERVER_NET, check=False)
            self._wg_stop()
            self._forwarding(False)

    def _wg_start(self, ns: Netns, ifname: str) -> int:
        log = open(self.workdir / f"{ifname}.log", "w")  # noqa: SIM115 (kept by the process)
        proc = ns.popen("wireguard-go", "-f", ifname, stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "LOG_LEVEL": "error"})
        self._wg.append((proc, ifname))
        sock = Path("/run/wireguard") / f"{ifname}.sock"
        wait_for(lambda: proc.poll() is not None or sock.exists(), 10,
                 f"wireguard-go's control socket {sock}")
        if proc.poll() is not None:
            raise RuntimeError(f"wireguard-go {ifname} exited with {proc.returncode}: "
                               + (self.workdir / f"{ifname}.log").read_text()[-1000:])
        return proc.pid

    def _wg_stop(self) -> None:
        while self._wg:
            proc, ifname = self._wg.pop()
            terminate(proc)
            # wireguard-go removes its socket on a clean exit; not after a kill.
            with contextlib.suppress(FileNotFoundError):
                (Path("/run/wireguard") / f"{ifname}.sock").unlink()

    def close(self) -> None:
        self._wg_stop()
        super().close()
