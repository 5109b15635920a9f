"""The UDP -> TUN thread reads the TUN right after its own writes, without root.

What the local stack answers inside a TUN write (an echo reply, a SYN-ACK) is in
the TUN when the write returns; the UDP -> TUN thread forwards it then, saving the
TUN -> UDP thread's wake-up on a round trip (bench/NOTES.md, "Round trip
latency"). Both threads read the TUN under one lock, so a flow's packets still
leave in the order the kernel queued them.

A unix datagram socketpair stands in for the TUN device (as in
test_fastpath_pump_loopback.py): the "kernel" end is the test's. The node is a
connector; the peer (the client) sends echo requests to a transit IP.
"""

import select
import socket

from pumpnet import SocketRig, ip, recv, rig_fixture
from scapy.layers.inet import ICMP, IP

import wgsessions
from conn25.core.iprange import IPRange
from conn25.fastpath import Datapath, monotonic_ms

CLIENT, TRANSIT, REAL = "100.64.0.1", "169.254.128.5", "203.0.113.10"
ECHO_ID = 7


def request(seq: int) -> bytes:
    """An echo request from the client to the transit IP (sealed by Rig.send)."""
    return bytes(IP(src=CLIENT, dst=TRANSIT) / ICMP(type=8, id=ECHO_ID, seq=seq) / b"ping")


def reply(seq: int) -> bytes:
    """What the connector's kernel answers, into the TUN: from the real address."""
    return bytes(IP(src=REAL, dst=CLIENT) / ICMP(type=0, id=ECHO_ID, seq=seq) / b"ping")


class Rig(SocketRig):
    def __init__(self) -> None:
        super().__init__(Datapath(client=False, connector=True))
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # plays the client
        t = self.dp.tables
        t.set_local([ip("100.64.0.2")])
        t.set_peer(1, ip("127.0.0.1"), self.peer.getsockname()[1], [ip(CLIENT)])
        t.set_transit(1, ip(TRANSIT), ip(REAL))
        t.set_transit_ranges([IPRange.parse("169.254.128.0/17")])
        self.remote = wgsessions.connect(self.dp, 1, monotonic_ms())

    def send(self, packet: bytes) -> None:
        """`packet` (b"": a keepalive) from the client, sealed under its session."""
        self.peer.sendto(self.remote.seal(packet), self.overlay.getsockname())


rig = rig_fixture(Rig)


def assert_reply(remote: wgsessions.Remote, dg: bytes, seq: int) -> None:
    """A reply on its way back to the client, sealed for it: SNAT real -> transit,
    checksum intact."""
    pkt = IP(remote.open(dg))
    assert (pkt.src, pkt.dst, pkt[ICMP].type, pkt[ICMP].seq) == (TRANSIT, CLIENT, 0, seq)
    sent = pkt[ICMP].chksum
    del pkt[ICMP].chksum
    assert IP(bytes(pkt))[ICMP].chksum == sent


def test_an_answer_in_the_tun_after_a_write_is_forwarded_without_the_tun_thread(rig):
    """With only the UDP -> TUN thread running, a packet that is in the TUN when its
    write returns (here queued beforehand: the stack's answer to the write) is read,
    translated with the flow that write created, sent and counted. A datagram that
    writes nothing to the TUN (a keepalive) does not make the thread read it."""
    rig.dp.start(rig.tun.fileno(), rig.overlay, _tun_thread=False)
    rig.kernel.send(reply(1))
    rig.send(request(1))
    req = IP(recv(rig.kernel))
    assert (req.src, req.dst, req[ICMP].seq) == (CLIENT, REAL, 1)  # DNAT transit -> real
    assert_reply(rig.remote, recv(rig.peer), 1)

    rig.kernel.send(reply(2))
    rig.send(b"")
    assert not select.select([rig.peer], [], [], 0.3)[0]  # no write: the TUN is not read
    rig.send(request(3))
    assert IP(recv(rig.kernel))[ICMP].seq == 3
    assert_reply(rig.remote, recv(rig.peer), 2)

    c = rig.dp.counters()
    assert (c["tun_rx"], c["tun_rx_after_write"], c["udp_tx"], c["tun_tx"]) == (2, 2, 2, 2)
    assert (c["translated"], c["flows_created"], c["keepalives_received"]) == (4, 1, 1)


def wait_counter(dp: Datapath, name: str, at_least: int, seconds: float = 5.0) -> dict:
    """The counters once `name` reached `at_least` (fails at the deadline)."""
    import time
    deadline = time.monotonic() + seconds
    while (c := dp.counters())[name] < at_least:
        assert time.monotonic() < deadline, f"{name} stayed at {c[name]}"
        select.select([], [], [], 0.005)
    return c


def test_after_an_isolated_packet_the_tun_thread_takes_the_answer_itself(rig):
    """A packet that comes alone after a quiet spell (a ping, a keystroke) makes the
    TUN -> UDP thread poll the overlay socket for a moment for the answer, saving the
    UDP -> TUN thread's wake-up on the way back. Here only the TUN -> UDP thread runs,
    and the answer already waits in the socket: it is delivered all the same."""
    # The flow first, through the datapath without pumps (the connector's DNAT).
    rig.send(request(1))
    dg, sender = rig.overlay.recvfrom(4096)
    assert rig.dp.process_datagram(dg, sender, monotonic_ms())[0] == "tun"
    rig.dp.start(rig.tun.fileno(), rig.overlay, _udp_thread=False)
    rig.send(request(2))  # "the answer": waits in the overlay socket
    select.select([rig.overlay], [], [], 5)
    rig.kernel.send(reply(1))  # the isolated packet: the kernel's reply into the TUN
    assert_reply(rig.remote, recv(rig.peer), 1)
    req = IP(recv(rig.kernel))  # request 2 reached the TUN, delivered by the TUN thread
    assert (req.src, req.dst, req[ICMP].seq) == (CLIENT, REAL, 2)
    c = wait_counter(rig.dp, "spin_hits", 1)
    assert (c["spins"], c["spin_hits"], c["tun_tx"]) == (1, 1, 1)


def test_a_burst_does_not_make_the_tun_thread_poll_the_socket(rig):
    """Only isolated packets do: three at once after a quiet spell, no spin."""
    rig.send(request(1))
    dg, sender = rig.overlay.recvfrom(4096)
    assert rig.dp.process_datagram(dg, sender, monotonic_ms())[0] == "tun"
    for seq in (1, 2, 3):
        rig.kernel.send(reply(seq))
    rig.dp.start(rig.tun.fileno(), rig.overlay, _udp_thread=False)
    for seq in (1, 2, 3):
        assert_reply(rig.remote, recv(rig.peer), seq)
    c = wait_counter(rig.dp, "udp_tx", 3)
    assert c["spins"] == 0
