"""Several TUN queues, one pump pair each, without root: unix datagram socketpairs stand in
for the queues of a multi-queue TUN, and the overlay sockets are loopback sockets that
share one port with SO_REUSEPORT, as the daemon binds them (pump.pxd, "Queues").

What must hold: the TUN -> UDP threads of different queues seal for one peer at once and
never use a nonce (counter) twice; each flow leaves in order; a packet from the overlay
goes into the TUN queue of its flow, every packet of a flow into the same one, so the
kernel reads the flow's answers there; joined super-packets never mix queues.
"""

from __future__ import annotations

import random
import select
import socket
import threading
import time
from collections import defaultdict

import pytest
from pumpnet import force_buffers, ip
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment

import wgsessions
from conn25._fastpath import _test_queue_of
from conn25.core.iprange import IPRange
from conn25.fastpath import Datapath, monotonic_ms

CLIENT, CONNECTOR, MAGIC, TRANSIT = "100.64.0.1", "100.64.0.2", "100.80.0.5", "169.254.128.5"
VNET_HDR, GSO_TCPV4 = 10, 1



def reuseport_sockets(count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    port = 0
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        socks.append(s)
    return socks


class QueueRig:
    """A client datapath on `queues` TUN stand-ins (the test holds the kernel's ends) and
    as many overlay sockets; MAGIC -> TRANSIT at peer 2, whose end of the session the
    test plays on a loopback socket."""

    def __init__(self, queues: int = 2) -> None:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(queues)]
        self.kernels = [k for k, _ in pairs]
        self.tuns = [t for _, t in pairs]
        self.overlays = reuseport_sockets(queues)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        for s in (*self.kernels, *self.tuns, self.peer):
            force_buffers(s)
        self.dp = Datapath(client=True)
        t = self.dp.tables
        t.set_local([ip(CLIENT)])
        t.set_peer(2, ip("127.0.0.1"), self.peer.getsockname()[1], [ip(CONNECTOR)])
        t.set_magic_ranges([IPRange.parse("100.80.0.0/16")])
        t.set_magic(ip(MAGIC), ip(TRANSIT))
        t.set_route(ip(TRANSIT), 2)
        self.remote = wgsessions.connect(self.dp, 2, monotonic_ms())

    def start(self, **kw) -> None:
        self.dp.start([t.fileno() for t in self.tuns], self.overlays, **kw)

    def from_peer(self, packet: bytes) -> None:
        self.peer.sendto(self.remote.seal(packet), self.overlays[0].getsockname())

    def close(self) -> None:
        self.dp.stop()
        for s in (*self.kernels, *self.tuns, *self.overlays, self.peer):
            s.close()


@pytest.fixture
def rig():
    r = QueueRig()
    try:
        yield r
    finally:
        r.close()


def drain(socks: list[socket.socket], count: int, timeout: float = 10.0) -> list[list[bytes]]:
    """What arrives on each of `socks` until `count` in all (failing after `timeout`)."""
    got: list[list[bytes]] = [[] for _ in socks]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select(socks, [], [], max(left, 0))
        assert ready, f"{sum(map(len, got))} of {count} arrived"
        for s in ready:
            got[socks.index(s)].append(s.recv(70000))
    return got


def test_start_checks_queues_and_sockets():
    r = QueueRig()
    try:
        fds = [t.fileno() for t in r.tuns]
        with pytest.raises(ValueError, match="one per queue"):
            r.dp.start(fds, r.overlays[:1])
        with pytest.raises(ValueError, match="from 1 to 16"):
            r.dp.start(fds * 9, r.overlays * 9)
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("127.0.0.1", 0))
        try:
            with pytest.raises(ValueError, match="SO_REUSEPORT"):
                r.dp.start(fds, [r.overlays[0], other])
        finally:
            other.close()
        assert not r.dp.running and r.dp.queues == 1
        r.start()
        assert r.dp.queues == 2 and len(r.dp.queue_counters()) == 2
        names = sorted(t.name for t in threading.enumerate() if t.name.startswith("conn25-"))
        assert names == ["conn25-tun-to-udp", "conn25-tun-to-udp-1",
                         "conn25-udp-to-tun", "conn25-udp-to-tun-1"]
    finally:
        r.close()


def test_queues_seal_for_one_peer_at_once_without_reusing_a_nonce(rig):
    """Both TUN queues hold a backlog of packets to the same peer when the pumps start:
    the two TUN -> UDP threads seal at once. Every datagram opens under the session,
    no counter appears twice (none is skipped either), and each flow arrives in order."""
    per_queue = 300
    for q, kernel in enumerate(rig.kernels):
        for seq in range(per_queue):
            kernel.send(bytes(IP(src=CLIENT, dst=MAGIC, flags="DF")
                              / TCP(sport=40000 + q, dport=443, seq=seq, flags="A")
                              / (b"q%d" % q * 100)))
    got = []
    reader = threading.Thread(target=lambda: got.extend(
        drain([rig.peer], 2 * per_queue)[0]))
    reader.start()
    rig.start()
    reader.join()
    assert len(got) == 2 * per_queue
    counters = [wgsessions.Remote.counter(dg) for dg in got]
    assert sorted(counters) == list(range(2 * per_queue))
    seqs = defaultdict(list)
    for dg in got:
        pkt = IP(rig.remote.open(dg))
        assert pkt.dst == TRANSIT
        seqs[pkt[TCP].sport].append(pkt[TCP].seq)
    assert seqs == {40000: list(range(per_queue)), 40001: list(range(per_queue))}
    per = rig.dp.queue_counters()
    assert [q["tun_rx"] for q in per] == [per_queue, per_queue]
    assert [q["udp_tx"] for q in per] == [per_queue, per_queue]
    c = rig.dp.counters()
    assert (c["tun_rx"], c["udp_tx"], c["udp_send_errors"]) == (2 * per_queue,
                                                                2 * per_queue, 0)


def test_packets_from_the_overlay_go_into_the_queue_of_their_flow(rig):
    """Sixteen UDP flows from the peer, three packets each: every packet arrives once,
    all of a flow on one queue and in order, in the queue pump_queue_of names, and the
    flows spread over both queues."""
    rig.start()
    ports = list(range(41000, 41016))
    sent = {}
    for n in range(3):
        for sport in ports:
            pkt = bytes(IP(src=CONNECTOR, dst=CLIENT) / UDP(sport=sport, dport=5000)
                        / (b"%d" % n * 20))
            sent[(sport, n)] = pkt
            rig.from_peer(pkt)
    got = drain(rig.kernels, len(sent))
    where: dict[int, set[int]] = defaultdict(set)
    order: dict[int, list[bytes]] = defaultdict(list)
    for q, packets in enumerate(got):
        for pkt in packets:
            sport = IP(pkt)[UDP].sport
            where[sport].add(q)
            order[sport].append(pkt)
            assert _test_queue_of(pkt, 2) == q
    assert all(len(qs) == 1 for qs in where.values()), where
    assert {q for qs in where.values() for q in qs} == {0, 1}
    assert order == {sport: [sent[(sport, n)] for n in range(3)] for sport in ports}
    per = rig.dp.queue_counters()
    assert sum(q["udp_rx"] for q in per) == len(sent) == sum(q["tun_tx"] for q in per)


def tcp_from_peer(dport: int, seq: int, payload: bytes) -> bytes:
    return bytes(IP(src=CONNECTOR, dst=CLIENT, flags="DF")
                 / TCP(sport=443, dport=dport, seq=seq, ack=1, flags="A", window=1000)
                 / payload)


def test_joined_super_packets_never_mix_queues(rig):
    """With virtio-net headers the UDP -> TUN thread joins a flow's consecutive segments;
    runs of two flows that go into different queues alternate in one receive batch, so
    what is pending is
    written into its own queue before the next flow's run begins: each queue gets its
    flow's bytes, whole and in order, in super-packets."""
    ports = {}
    for dport in range(50000, 50100):  # one flow per queue
        ports.setdefault(_test_queue_of(tcp_from_peer(dport, 0, b"x"), 2), dport)
        if len(ports) == 2:
            break
    mss, runs, per_run = 1000, 6, 4
    data = {q: bytes((q * 7 + i) % 251 for i in range(mss * runs * per_run)) for q in ports}
    for r in range(runs):
        for q, dport in sorted(ports.items()):
            for i in range(per_run):
                off = (r * per_run + i) * mss
                rig.from_peer(tcp_from_peer(dport, 1 + off, data[q][off:off + mss]))
    rig.start(vnet_hdr=True)  # the datagrams wait on the socket: one receive batch
    got: dict[int, bytes] = {0: b"", 1: b""}
    supers = 0
    deadline = time.monotonic() + 10
    while any(len(got[q]) < len(data[q]) for q in ports):
        left = deadline - time.monotonic()
        ready, _, _ = select.select(rig.kernels, [], [], max(left, 0))
        assert ready, {q: len(b) for q, b in got.items()}
        for s in ready:
            q = rig.kernels.index(s)
            msg = s.recv(70000)
            gso_type = msg[1]
            supers += gso_type == GSO_TCPV4
            pkt = IP(msg[VNET_HDR:])
            assert pkt[TCP].dport == ports[q], "a segment in the other flow's queue"
            assert pkt[TCP].seq == 1 + len(got[q]), "out of order"
            got[q] += bytes(pkt[TCP].payload)
    assert got == data
    assert supers > 0 and rig.dp.counters()["tun_super_packets"] == supers


# -- the round trip's shortcuts across queues (test_fastpath_pump_roundtrip.py has them
# on one queue): a connector; the peer (the client) pings a transit IP.

REAL, ECHO_ID = "203.0.113.10", 7


def echo(seq: int, *, request: bool) -> bytes:
    """An echo request from the client to the transit IP (as the peer sends it), or the
    kernel's reply into the TUN (from the real address)."""
    if request:
        return bytes(IP(src=CLIENT, dst=TRANSIT) / ICMP(type=8, id=ECHO_ID, seq=seq) / b"p")
    return bytes(IP(src=REAL, dst=CLIENT) / ICMP(type=0, id=ECHO_ID, seq=seq) / b"p")


class ConnectorRig(QueueRig):
    def __init__(self) -> None:
        super().__init__()
        self.dp = Datapath(client=False, connector=True)
        t = self.dp.tables
        t.set_local([ip(CONNECTOR)])
        t.set_peer(1, ip("127.0.0.1"), self.peer.getsockname()[1], [ip(CLIENT)])
        t.set_transit(1, ip(TRANSIT), ip(REAL))
        t.set_transit_ranges([IPRange.parse("169.254.128.0/17")])
        self.remote = wgsessions.connect(self.dp, 1, monotonic_ms())

    def delivered(self, seq: int) -> int:
        """The queue the request `seq` came out of (DNAT transit -> real), or fail."""
        (q, pkt), = [(q, IP(p)) for q, ps in enumerate(drain(self.kernels, 1)) for p in ps]
        assert (pkt.src, pkt.dst, pkt[ICMP].type, pkt[ICMP].seq) == (CLIENT, REAL, 8, seq)
        return q

    def replied(self, seq: int) -> None:
        pkt = IP(self.remote.open(drain([self.peer], 1)[0][0]))
        assert (pkt.src, pkt.dst, pkt[ICMP].type, pkt[ICMP].seq) == (TRANSIT, CLIENT, 0, seq)


@pytest.fixture
def crig():
    r = ConnectorRig()
    try:
        yield r
    finally:
        r.close()


def test_the_udp_thread_reads_the_queue_it_wrote_into(crig):
    """Only the UDP -> TUN threads run: the request goes into its flow's queue, and the
    answer the kernel queued there (as its flow table sends a flow's packets into the
    queue they came from) is read right after, from that queue, and sent."""
    queue = _test_queue_of(bytes(IP(src=CLIENT, dst=REAL) / ICMP(type=8, id=ECHO_ID, seq=1)
                                 / b"p"), 2)
    crig.start(_tun_thread=False)
    crig.kernels[queue].send(echo(1, request=False))
    crig.from_peer(echo(1, request=True))
    assert crig.delivered(1) == queue
    crig.replied(1)
    per = crig.dp.queue_counters()
    assert per[queue]["tun_rx"] == 1 and per[1 - queue]["tun_rx"] == 0
    assert crig.dp.counters()["tun_rx_after_write"] == 1


@pytest.mark.parametrize("queue", [0, 1])
def test_an_isolated_packet_on_either_queue_finds_its_answer_on_any_socket(crig, queue):
    """Only the TUN -> UDP threads run; the peer's answer waits on the socket its
    address hashes to, which for one of the two queues is the other queue's: the spin
    after an isolated packet polls every socket, so it is delivered either way."""
    crig.from_peer(echo(1, request=True))  # the flow first, without pumps
    (sock,) = select.select(crig.overlays, [], [], 5)[0]
    dg, sender = sock.recvfrom(4096)
    assert crig.dp.process_datagram(dg, sender, monotonic_ms())[0] == "tun"
    crig.start(_udp_thread=False)
    crig.from_peer(echo(2, request=True))  # "the answer": waits on its socket
    select.select([sock], [], [], 5)
    crig.kernels[queue].send(echo(1, request=False))  # the isolated packet
    crig.replied(1)
    crig.delivered(2)
    deadline = time.monotonic() + 5
    while crig.dp.counters()["spin_hits"] < 1:
        assert time.monotonic() < deadline, "no spin hit"
        select.select([], [], [], 0.005)
    assert crig.dp.queue_counters()[queue]["tun_rx"] == 1


def test_the_queue_of_a_packet_follows_its_flow():
    """pump_queue_of: the queue depends on addresses, protocol and ports only (not the
    payload, TTL or IPv4 ID); every fragment of a datagram has the first one's queue, as
    the kernel's flow hash gives them one too; flows that differ only in a port spread;
    any bytes give a queue in range."""
    def udp(sport: int, payload: bytes = b"x", **kw) -> bytes:
        return bytes(IP(src=CONNECTOR, dst=CLIENT, **kw) / UDP(sport=sport, dport=53)
                     / payload)

    assert _test_queue_of(udp(1000), 1) == 0
    for queues in (2, 3, 16):
        same = {_test_queue_of(udp(1000, b"y" * n, ttl=9 + n, id=n), queues)
                for n in range(20)}
        assert len(same) == 1
        spread = {_test_queue_of(udp(sport), queues) for sport in range(1000, 1200)}
        assert spread == set(range(queues))
    whole = IP(src=CONNECTOR, dst=CLIENT, id=77) / UDP(sport=1, dport=2) / (b"z" * 3000)
    frags = [bytes(f) for f in fragment(whole, fragsize=1000)]
    assert len(frags) == 4
    assert len({_test_queue_of(f, 16) for f in frags}) == 1
    rand = random.Random(5)
    for n in range(0, 80):
        blob = bytes(rand.getrandbits(8) for _ in range(n))
        assert 0 <= _test_queue_of(blob, 5) < 5
