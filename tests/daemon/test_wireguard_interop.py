"""Our WireGuard handshake against a peer we did not write: Debian's wireguard-go.

Two namespaces this module creates, joined by one veth (192.0.2.0/24): wireguard-go in
one, configured only with `wg set` and `ip`, tunnel address 100.64.0.2; a Python UDP socket
in the other, speaking for 100.64.0.1 through conn25.core.wireguard. Nothing routes out.
Every wait has a deadline and a bounded count.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP

from conn25.core.wireguard import keys
from conn25.core.wireguard.device import Device, Received
from conn25.core.wireguard.peer import Peer
from conn25.core.wireguard.transport import pad
from conn25.lab.netns import Netns, link
from conn25.lab.wggo import WireguardGo, wireguard_missing

pytestmark = pytest.mark.root

WG_UNDERLAY, PY_UNDERLAY = "192.0.2.1", "192.0.2.2"
WG_PORT = 51820
WG_TUNNEL, PY_TUNNEL = "100.64.0.2", "100.64.0.1"
CLONE_NEWNET = 0x40000000


def udp_socket_in(ns: Netns, addr: tuple[str, int]) -> socket.socket:
    """A UDP socket bound in namespace `ns`: made by a short-lived thread that enters the
    namespace (setns changes only the calling thread; the socket keeps its namespace)."""
    made: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{ns.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(addr)
            made.append(s)
        except BaseException as e:
            made.append(e)

    t = threading.Thread(target=enter)
    t.start()
    t.join(timeout=10)
    assert made, "the thread making the namespaced socket did not finish"
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def ip_packet(payload: bytes) -> IP:
    """The IPv4 packet in a transport payload, its zero padding cut by the IP total length."""
    return IP(payload[: int.from_bytes(payload[2:4], "big")])


@dataclass
class Lab:
    wg: Netns
    sock: socket.socket
    device: Device
    peer: Peer
    log: Path

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (WG_UNDERLAY, WG_PORT))

    def receive_until(self, want: Callable[[Received], bool], what: str,
                      timeout: float = 10, limit: int = 50) -> tuple[Received, tuple[str, int]]:
        """Feed datagrams to our device until one gives what `want` wants."""
        deadline = time.monotonic() + timeout
        for _ in range(limit):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                break
            got = self.device.receive(data, socket.inet_aton(src[0]) + src[1].to_bytes(2, "big"),
                                      time.monotonic())
            if want(got):
                return got, src
        raise AssertionError(f"no {what} from wireguard-go within {timeout}s; its log:\n"
                             + self.log.read_text())


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if (why := wireguard_missing()) is not None:
        pytest.fail(why)
    wg, py = Netns("wg"), Netns("py")
    sock: socket.socket | None = None
    wgo: WireguardGo | None = None
    try:
        link(wg, f"{WG_UNDERLAY}/24", py, f"{PY_UNDERLAY}/24")
        sock = udp_socket_in(py, (PY_UNDERLAY, 0))
        wg_private = keys.generate_private()
        wgo = WireguardGo(wg, tmp_path / "wireguard-go.log", tmp_path / "wg.key", wg_private)
        device = Device(keys.generate_private())
        wgo.set("listen-port", str(WG_PORT), "peer", keys.encode(device.identity.public),
                "allowed-ips", f"{PY_TUNNEL}/32",
                "endpoint", "{}:{}".format(*sock.getsockname()))
        wgo.up(f"{WG_TUNNEL}/32", f"{PY_TUNNEL}/32")
        peer = device.add_peer(keys.public_from_private(wg_private))
        yield Lab(wg, sock, device, peer, wgo.log)
    finally:
        if sock is not None:
            sock.close()
        if wgo is not None:
            wgo.close()
        wg.close()
        py.close()


def test_we_initiate_and_ping_wireguard_go(lab: Lab):
    lab.send(lab.peer.begin_handshake(time.monotonic(), time.time()))
    got, _ = lab.receive_until(lambda r: r.keypair is not None, "handshake response")
    assert got.keypair is not None and got.keypair.is_initiator

    request = IP(src=PY_TUNNEL, dst=WG_TUNNEL) / ICMP(type=8, id=0x2525, seq=1) / b"conn25d"
    data = lab.peer.encrypt(pad(bytes(request)), time.monotonic())
    assert data is not None
    lab.send(data)

    got, _ = lab.receive_until(lambda r: bool(r.payload), "transport data")
    assert got.payload is not None
    reply = ip_packet(got.payload)
    assert (reply.src, reply.dst) == (WG_TUNNEL, PY_TUNNEL)
    assert reply[ICMP].type == 0 and (reply[ICMP].id, reply[ICMP].seq) == (0x2525, 1)
    assert bytes(reply[ICMP].payload) == b"conn25d"


def test_wireguard_go_initiates_and_we_answer_its_ping(lab: Lab):
    ping = lab.wg.popen("ping", "-c", "1", "-W", "10", "-n", PY_TUNNEL,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    got, src = lab.receive_until(lambda r: r.reply is not None, "handshake initiation")
    assert got.keypair is not None and not got.keypair.is_initiator
    assert got.reply is not None
    lab.sock.sendto(got.reply, src)

    got, src = lab.receive_until(lambda r: bool(r.payload), "the ping in transport data")
    assert got.payload is not None
    request = ip_packet(got.payload)
    assert (request.src, request.dst) == (WG_TUNNEL, PY_TUNNEL)
    assert request[ICMP].type == 8
    # Its first transport message confirmed our responder session.
    assert lab.peer.current is not None and lab.peer.next is None

    echo = request[ICMP]
    answer = IP(src=PY_TUNNEL, dst=WG_TUNNEL) / ICMP(type=0, id=echo.id, seq=echo.seq) / \
        bytes(echo.payload)
    data = lab.peer.encrypt(pad(bytes(answer)), time.monotonic())
    assert data is not None
    lab.sock.sendto(data, src)
    out, _ = ping.communicate(timeout=15)
    assert ping.returncode == 0, out


def test_keys_are_interchangeable_with_wg_genkey_and_pubkey():
    if (why := wireguard_missing()) is not None:
        pytest.fail(why)

    def wg(*args: str, stdin: str = "") -> str:
        r = subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True,
                           timeout=10, check=True)
        return r.stdout.strip()

    ours = keys.generate_private()
    assert wg("pubkey", stdin=keys.encode(ours)) == keys.encode(keys.public_from_private(ours))
    theirs = keys.decode(wg("genkey"))
    assert keys.encode(keys.public_from_private(theirs)) == wg("pubkey", stdin=keys.encode(theirs))
