"""A throwaway tailnet in network namespaces, for `conn25d demo` and the end-to-end tests.

    inet ns: the "internet" — a router between the nodes, dnsmasq on 198.51.100.53,
             a web server on 198.51.100.10 / 2001:db8:100::10 that answers with the
             address it sees the request from (/bytes/N: N zero bytes, /pattern/N: N
             bytes of PAGE_PATTERN repeated; POST /digest: the length and SHA-256 of
             the body), iperf3.
    one ns per node: a veth to inet (203.0.113.4i+2/30, 2001:db8:i::2/64, default
             route via inet), its underlay endpoint 192.0.2.i on lo, conn25d, and
             a key pair of its own (the private key where `up` looks by default,
             STATE_DIR/private.key, mode 0600, under the testbed's workdir). Its
             resolver configuration, /etc/netns/NS/resolv.conf (which `ip netns exec`
             bind-mounts over /etc/resolv.conf), names inet's dnsmasq, as a host's
             would; a node that sees apps points it at itself while it runs
             (`up --accept-dns`, given that file with --resolv-conf so no node can
             reach the host's own).
    a node behind a NAT (NodeSpec(behind_nat=True), in no default testbed): the veth to
             inet and the addresses above go to a "nat" namespace in front of it, which
             masquerades (nftables) what the node sends from its LAN (192.0.2.128+4i+2/30,
             IPv4 only) to inet; the tailnet file gives the node no endpoint. 192.0.2.i,
             which inet routes to the NAT, is the NAT's second outside address, the one
             remap_nat() moves the node's mappings to.

Only documentation, reserved and overlay addresses; the namespaces reach nothing
but each other. Everything is removed by close(), also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..core.wireguard import keys as wgkeys
from ..daemon import keyfile
from .netns import Netns, sh, terminate, wait_for

WEB4, WEB6, DNS4 = "198.51.100.10", "2001:db8:100::10", "198.51.100.53"
# A second address of the web server that only one name resolves to: a connector
# maps it to one transit IP per client, so its return packets name their flow.
SOLO4 = "198.51.100.11"
APP_TAG = "tag:example-connector"
# What /pattern/N repeats: bytes no other traffic holds, so a capture can tell whether a
# page crossed a link in clear (every 32-byte window of such a page is one of its rotations).
PAGE_PATTERN = b"conn25d test page: on the underlay only inside WireGuard|"
NAT_TABLE = "conn25lab_nat"  # the nftables table of a NAT namespace
FLUSH_CONNTRACK = ("from pyroute2 import NFCTSocket\n"
                   "with NFCTSocket() as s:\n    s.flush()\n")

WEB_SERVER = r"""
import hashlib, http.server, socket, sys, time
PATTERN = @PAGE_PATTERN@
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # /digest: the body's length and SHA-256, "N HEX"
        n = int(self.headers.get("Content-Length", 0))
        h, left = hashlib.sha256(), n
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        body = f"{n - left} {h.hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path.startswith("/pattern/"):  # /pattern/N: N bytes of PATTERN, repeated
            n = int(self.path[9:])
            body = (PATTERN * (n // len(PATTERN) + 1))[:n]
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/bytes/"):  # /bytes/N[?pace=BYTES_PER_SECOND]
            path, _, query = self.path.partition("?")
            n, pace = int(path[7:]), int(query.removeprefix("pace=") or 0)
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                n -= self.wfile.write(bytes(min(n, 16384)))
                if pace:  # the server sets the speed, so the client only ever acknowledges
                    time.sleep(16384 / pace)
            return
        body = ("you came from " + self.client_address[0].removeprefix("::ffff:") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
S(("::", 80), H).serve_forever()
""".replace("@PAGE_PATTERN@", repr(PAGE_PATTERN))


def pattern_page(n: int) -> bytes:
    """What the web server answers to /pattern/N."""
    return (PAGE_PATTERN * (n // len(PAGE_PATTERN) + 1))[:n]


# dnsmasq records of the test internet: an app name with A and AAAA, a CNAME chain
# (www -> edge -> cdn), a wildcard subdomain, and a name of no app.
DNS_RECORDS = (
    f"--host-record=example.com,{WEB4},{WEB6}",
    f"--host-record=cdn.example.net,{WEB4},{WEB6}",
    "--cname=www.example.com,edge.example.net",
    "--cname=edge.example.net,cdn.example.net",
    f"--address=/wild.example.com/{WEB4}", f"--address=/wild.example.com/{WEB6}",
    f"--host-record=direct.example.net,{WEB4},{WEB6}",
    f"--host-record=solo.example.com,{SOLO4}",
)


def start_servers(ns: Netns, workdir: Path, dns_records: Iterable[str]) -> None:
    """dnsmasq on DNS4 with `dns_records`, the web server and iperf3 on WEB4, in `ns`
    (which must hold those addresses); returns once all three listen."""
    log = open(workdir / "dnsmasq.log", "w")  # noqa: SIM115 (kept by the process)
    ns.popen("dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
             "--conf-file=/dev/null", f"--listen-address={DNS4}", "--bind-interfaces",
             "--local-ttl=300", "--pid-file=", *dns_records,
             stdout=log, stderr=subprocess.STDOUT)
    ns.popen(sys.executable, "-c", WEB_SERVER, stdout=subprocess.DEVNULL,
             stderr=subprocess.DEVNULL)
    # Bound to the server address, so UDP replies leave from it.
    ns.popen("iperf3", "-s", "-B", WEB4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: all(p in ns.run("ss", "-Hltn").stdout for p in (":80 ", ":5201 ")),
             20, "the web and iperf3 servers")
    wait_for(lambda: f"{DNS4}:53" in ns.run("ss", "-Hlun").stdout, 20, "dnsmasq")


class NodeSpec:
    def __init__(self, name: str, index: int, *, user: str | None = None,
                 tags: tuple[str, ...] = (), connector: bool = False,
                 behind_nat: bool = False, keepalive: int | None = None) -> None:
        self.name, self.index, self.user, self.tags = name, index, user, tags
        self.connector = connector
        self.behind_nat = behind_nat
        self.keepalive = keepalive  # the file's persistentKeepalive (None: not given)
        # Behind a NAT: the node's LAN, between it and the NAT.
        self.lan4 = f"192.0.2.{128 + 4 * index + 2}"
        self.lan_gw4 = f"192.0.2.{128 + 4 * index + 1}"
        self.overlay4 = f"100.64.0.{index}"
        self.overlay6 = f"fd7a:115c:a1e0::{index}"
        self.endpoint = f"192.0.2.{index}"
        self.link4 = f"203.0.113.{4 * index + 2}"  # also the connector's egress address
        self.gw4 = f"203.0.113.{4 * index + 1}"
        self.link6 = f"2001:db8:{index}::2"
        self.gw6 = f"2001:db8:{index}::1"
        # A fresh pair per spec: keys of a throwaway tailnet, known to no other run.
        self.private_key = wgkeys.generate_private()
        self.public_key = wgkeys.public_from_private(self.private_key)


DEFAULT_NODES = (
    NodeSpec("client", 1, user="alice@example.com"),
    NodeSpec("conn1", 2, tags=(APP_TAG,), connector=True),
    NodeSpec("conn2", 3, tags=(APP_TAG,), connector=True),
    NodeSpec("peer", 4, user="bob@example.com"),
    NodeSpec("blocked", 5, user="mallory@example.com"),
)


def tailnet_file(nodes: tuple[NodeSpec, ...]) -> str:
    """The tailnet: one app (example.com, *.example.com), staff may use it, mallory may not."""
    doc = {
        "tagOwners": {APP_TAG: ["group:staff"]},
        "groups": {"group:staff": ["alice@example.com", "bob@example.com"]},
        "acls": [{"action": "accept", "src": ["group:staff"],
                  "dst": ["autogroup:internet:*"]}],
        "nodeAttrs": [{"target": ["*"], "app": {"tailscale.com/app-connectors": [
            {"name": "Example", "connectors": [APP_TAG],
             "domains": ["example.com", "*.example.com"]}]}}],
        "nodes": [
            {"name": n.name, "addresses": [n.overlay4, n.overlay6],
             **({} if n.behind_nat else {"endpoint": f"{n.endpoint}:41641"}),
             **({} if n.keepalive is None else {"persistentKeepalive": n.keepalive}),
             "publicKey": wgkeys.encode(n.public_key),
             **({"user": n.user} if n.user else {}), **({"tags": list(n.tags)} if n.tags else {}),
             **({"egressIPs": [n.link4]} if n.connector else {})}
            for n in nodes
        ],
    }
    return "// written by conn25.lab.testbed\n" + json.dumps(doc, indent=2) + "\n"


ORIGINAL_RESOLV_CONF = f"# the test internet's resolver\nnameserver {DNS4}\n"


def tun_offload_default() -> bool:
    """Whether testbed nodes run with the TUN offloads (the daemon's default):
    CONN25_TUN_OFFLOAD=0 in the environment runs the end-to-end suite with them off."""
    value = os.environ.get("CONN25_TUN_OFFLOAD", "1")
    if value not in ("0", "1"):
        raise ValueError(f"CONN25_TUN_OFFLOAD must be 0 or 1, got {value!r}")
    return value == "1"


class Testbed:
    __test__ = False  # not a pytest test class
    # The nodes manage their namespace's resolv.conf (--accept-dns). False: it says
    # "nameserver 100.100.100.100" throughout and nodes run with --accept-dns=false.
    node_dns = True

    def __init__(self, workdir: Path, nodes: tuple[NodeSpec, ...] = DEFAULT_NODES, *,
                 tun_offload: bool | None = None) -> None:
        self.workdir = Path(workdir)
        self.specs = {n.name: n for n in nodes}
        # Whether nodes run with the TUN offloads (None: tun_offload_default()).
        self.tun_offload = tun_offload_default() if tun_offload is None else tun_offload
        self.ns: dict[str, Netns] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._etc: list[Path] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------

    def _build(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tailnet_path = self.workdir / "tailnet.hujson"
        self.tailnet_path.write_text(tailnet_file(tuple(self.specs.values())))
        inet = self.ns["inet"] = Netns("inet")
        inet.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        inet.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        for addr in (f"{WEB4}/32", f"{SOLO4}/32", f"{DNS4}/32", f"{WEB6}/128"):
            inet.run("ip", "addr", "add", addr, "dev", "lo")
        for spec in self.specs.values():
            ns = self.ns[spec.name] = Netns(spec.name)
            # What faces inet: the node itself, or the NAT in front of it.
            edge = ns
            if spec.behind_nat:
                edge = self.ns[self._nat_key(spec.name)] = Netns("nat")
            a, b = f"i{spec.index}", "up0"
            sh("ip", "link", "add", a, "netns", inet.name, "type", "veth", "peer", "name", b,
               "netns", edge.name)
            inet.run("ip", "addr", "add", f"{spec.gw4}/30", "dev", a)
            inet.run("ip", "addr", "add", f"{spec.gw6}/64", "dev", a, "nodad")
            inet.run("ip", "link", "set", a, "up")
            inet.run("ip", "route", "add", f"{spec.endpoint}/32", "via", spec.link4)
            edge.run("ip", "addr", "add", f"{spec.link4}/30", "dev", b)
            edge.run("ip", "addr", "add", f"{spec.link6}/64", "dev", b, "nodad")
            edge.run("ip", "link", "set", b, "up")
            edge.run("ip", "addr", "add", f"{spec.endpoint}/32", "dev", "lo")
            edge.run("ip", "route", "add", "default", "via", spec.gw4)
            edge.run("ip", "-6", "route", "add", "default", "via", spec.gw6)
            if spec.behind_nat:
                self._nat(spec, edge, ns)
            etc = Path("/etc/netns") / ns.name
            etc.mkdir(parents=True, exist_ok=True)
            self._etc.append(etc)
            (etc / "resolv.conf").write_text(ORIGINAL_RESOLV_CONF if self.node_dns
                                             else "nameserver 100.100.100.100\n")
        self._start_servers()

    @staticmethod
    def _nat_key(name: str) -> str:
        return f"{name}.nat"

    def _nat(self, spec: NodeSpec, nat: Netns, ns: Netns) -> None:
        """`nat` in front of node `ns`: their LAN, and a masquerade of the LAN to inet."""
        sh("ip", "link", "add", "lan0", "netns", nat.name, "type", "veth", "peer", "name",
           "up0", "netns", ns.name)
        nat.run("ip", "addr", "add", f"{spec.lan_gw4}/30", "dev", "lan0")
        nat.run("ip", "link", "set", "lan0", "up")
        nat.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        nat.run("nft", "add", "table", "ip", NAT_TABLE)
        nat.run("nft", "add", "chain", "ip", NAT_TABLE, "post",
                "{ type nat hook postrouting priority srcnat; }")
        nat.run("nft", "add", "rule", "ip", NAT_TABLE, "post", "oifname", "up0", "masquerade")
        ns.run("ip", "addr", "add", f"{spec.lan4}/30", "dev", "up0")
        ns.run("ip", "link", "set", "up0", "up")
        ns.run("ip", "route", "add", "default", "via", spec.lan_gw4)

    def nat(self, name: str) -> Netns:
        """The NAT namespace in front of node `name` (a NodeSpec with behind_nat)."""
        return self.ns[self._nat_key(name)]

    def remap_nat(self, name: str, ports: str = "20000-20999") -> None:
        """From now on the NAT in front of `name` maps what it sends to its second outside
        address (and TCP/UDP to a port in `ports`), and it forgets the mappings it had
        (its conntrack table flushed), as a NAT does when it restarts or when the node
        moves to another network: every flow gets a new outside address and port."""
        spec, nat = self.specs[name], self.nat(name)
        nat.run("nft", "flush", "chain", "ip", NAT_TABLE, "post")
        nat.run("nft", "add", "rule", "ip", NAT_TABLE, "post", "oifname", "up0",
                "meta", "l4proto", "{ tcp, udp }", "snat", "to", f"{spec.endpoint}:{ports}")
        nat.run("nft", "add", "rule", "ip", NAT_TABLE, "post", "oifname", "up0",
                "snat", "to", spec.endpoint)
        # Without the flush, flows that have a mapping keep it whatever the rules say.
        nat.run(sys.executable, "-c", FLUSH_CONNTRACK)

    def _start_servers(self) -> None:
        start_servers(self.ns["inet"], self.workdir, DNS_RECORDS)

    # -- nodes ------------------------------------------------------------------

    def resolv_conf(self, name: str) -> Path:
        """Node `name`'s resolver configuration (/etc/resolv.conf in its namespace)."""
        return Path("/etc/netns") / self.ns[name].name / "resolv.conf"

    def state_dir(self, name: str) -> Path:
        return self.workdir / "state" / name

    def private_key_path(self, name: str) -> Path:
        return self.state_dir(name) / "private.key"

    def key_file(self, name: str) -> Path:
        """The node's private key file (made from its spec, 0600, if it is not there yet:
        a node never started has none), for `up` and for conn25.lab.wgmember."""
        path = self.private_key_path(name)
        if not path.exists():
            keyfile.create(path, self.specs[name].private_key)
        return path

    def start(self, name: str, *extra: str, wait: bool = True,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Run `conn25d up` for node `name` (`env`: variables to add to its environment)."""
        spec = self.specs[name]
        self.key_file(name)
        args = [sys.executable, "-m", "conn25", "up", "--tailnet", str(self.tailnet_path),
                "--hostname", name, "--state-dir", str(self.state_dir(name)),
                "--log-level", "debug", *self._dns_args(name), *extra]
        if spec.connector:
            args.append("--advertise-connector")
        if not self.tun_offload:
            args.append("--tun-offload=false")
        log = open(self.workdir / f"{name}.log", "a")  # noqa: SIM115 (kept by the process)
        proc = self.ns[name].popen(*args, stdout=log, stderr=subprocess.STDOUT,
                                   env=None if env is None else {**os.environ, **env})
        self.procs[name] = proc
        if wait:
            sock = self.state_dir(name) / "conn25d.sock"
            wait_for(lambda: proc.poll() is not None or self.status(name) is not None, 20,
                     f"conn25d on {name} to serve")
            if proc.poll() is not None:
                raise RuntimeError(f"conn25d on {name} exited with {proc.returncode}:\n"
                                   + self.log(name)[-3000:])
            assert sock.exists()
        return proc

    def _dns_args(self, name: str) -> list[str]:
        resolv = self.resolv_conf(name)
        if self.node_dns and resolv.exists():
            return ["--resolv-conf", str(resolv)]  # upstreams: the file's, DNS4
        return ["--accept-dns=false", "--upstream-dns", DNS4]

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Stop a node's conn25d (by PID); its exit status."""
        return terminate(self.procs.pop(name), sig, timeout)

    def status(self, name: str) -> dict | None:
        """The node's status document, or None while it does not answer."""
        r = subprocess.run([sys.executable, "-m", "conn25", "status", "--json",
                            "--state-dir", str(self.state_dir(name))],
                           capture_output=True, text=True, timeout=15)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def peer_status(self, name: str, peer: str) -> dict:
        """Node `name`'s view of its WireGuard peer `peer` (an entry of status `peers`)."""
        doc = self.status(name)
        if doc is None:
            raise AssertionError(f"conn25d on {name} does not answer")
        found = [p for p in doc["peers"] if p["name"] == peer]
        if len(found) != 1:
            raise AssertionError(f"{name} has not one peer {peer}: {doc['peers']}")
        return found[0]

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text()
        except OSError:
            return ""

    def run(self, name: str, *args: str, check: bool = False,
            timeout: float = 30) -> subprocess.CompletedProcess:
        return self.ns[name].run(*args, check=check, timeout=timeout)

    def curl(self, name: str, url: str, *extra: str) -> subprocess.CompletedProcess:
        """curl from node `name`, IPv4 unless -6 is among `extra`."""
        family = () if "-6" in extra else ("-4",)
        return self.run(name, "curl", "-sS", "-m", "10", *family, *extra, url)

    # -- teardown ----------------------------------------------------------------

    def close(self) -> None:
        for name in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(name)
        for ns in self.ns.values():
            ns.close()
        for etc in self._etc:
            shutil.rmtree(etc, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def serving(cls, workdir: Path, names: Iterable[str],
                nodes: tuple[NodeSpec, ...] = DEFAULT_NODES) -> Iterator[Testbed]:
        """A testbed of `nodes` with conn25d running on `names`; on exit everything is
        removed (checked), and the tail of every node's log is printed for the test report."""
        tb = cls(workdir, nodes)
        try:
            for name in names:
                tb.start(name)
            yield tb
        finally:
            logs = {n: tb.log(n)[-4000:] for n in tb.specs}
            tb.close()
            for ns in tb.ns.values():
                assert not ns.exists(), f"{ns} left behind"
            print("\n".join(f"--- {n}\n{text}" for n, text in logs.items() if text))

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

