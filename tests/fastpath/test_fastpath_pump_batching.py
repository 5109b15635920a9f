"""How the pumps batch, without root: UDP GSO on the way out, UDP GRO on the way in,
the fallback when the kernel refuses GSO, and the control plane woken once per new
event rather than once per batch. A unix datagram socketpair stands in for the TUN
device (as in test_fastpath_pump_loopback.py); the overlay runs on loopback UDP.

Packets are queued before the pumps start where a test needs them in one batch: the
TUN pump then reads them all before its first send. Each test runs on an IPv4 and on
an IPv6 overlay socket.
"""

import os
import select
import socket
import struct

import pytest
from pumpnet import ip, recv
from scapy.layers.inet import IP, TCP

import wgsessions
from conn25.core.iprange import IPRange
from conn25.fastpath import Datapath, EventKind, monotonic_ms
from conn25.lab.netns import wait_for

CLIENT, CONNECTOR, CONNECTOR2 = "100.64.0.1", "100.64.0.2", "100.64.0.3"
MAGIC, MAGIC2, T1, T2 = "100.80.0.5", "100.80.0.6", "169.254.128.5", "169.254.128.6"
SO_NO_CHECK = 11  # <asm-generic/socket.h>: send UDP without checksums, which GSO refuses
SOL_UDP, UDP_NO_CHECK6_TX, UDP_NO_CHECK6_RX, UDP_SEGMENT = 17, 101, 102, 103




def readable(fd) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def out(dst, seq, payload=200, sport=40000):
    """An app packet towards a magic IP; `seq` tells packets apart after translation."""
    return bytes(IP(src=CLIENT, dst=dst) / TCP(sport=sport, dport=443, seq=seq, flags="A")
                 / (b"x" * payload))


class Rig:
    """A client datapath with two connectors (peer 2 for MAGIC, peer 3 for MAGIC2)."""

    def __init__(self, family: socket.AddressFamily = socket.AF_INET) -> None:
        lo = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.app, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.overlay = socket.socket(family, socket.SOCK_DGRAM)
        self.overlay.bind((lo, 0))
        self.peers = {}
        for pid in (2, 3):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((lo, 0))
            self.peers[pid] = s
        self.dp = Datapath(client=True)
        t = self.dp.tables
        t.set_local([ip(CLIENT)])
        t.set_peer(2, ip(lo), self.peers[2].getsockname()[1], [ip(CONNECTOR)])
        t.set_peer(3, ip(lo), self.peers[3].getsockname()[1], [ip(CONNECTOR2)])
        t.set_magic_ranges([IPRange.parse("100.80.0.0/16")])
        t.set_magic(ip(MAGIC), ip(T1))
        t.set_magic(ip(MAGIC2), ip(T2))
        t.set_route(ip(T1), 2)
        t.set_route(ip(T2), 3)
        # A session with each connector, which the test plays (distinct indices and keys).
        self.remotes = {
            pid: wgsessions.connect(self.dp, pid, monotonic_ms(), local_index=pid,
                                    remote_index=100 + pid, key_out=bytes([pid]) * 32)
            for pid in (2, 3)}

    def start(self) -> None:
        self.dp.start(self.tun.fileno(), self.overlay)

    def close(self) -> None:
        self.dp.stop()
        for s in (self.app, self.tun, self.overlay, *self.peers.values()):
            s.close()


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["udp4", "udp6"])
def rig(request):
    r = Rig(request.param)
    try:
        yield r
    finally:
        r.close()


def assert_translated(remote: wgsessions.Remote, dg: bytes, transit: str, seq: int,
                      payload: int) -> None:
    """One datagram: a transport message of the peer's session that holds the
    packet with its destination translated and a valid TCP checksum."""
    pkt = IP(remote.open(dg))
    assert (pkt.dst, pkt[TCP].seq, len(pkt[TCP].payload)) == (transit, seq, payload)
    sent = pkt[TCP].chksum
    del pkt[TCP].chksum
    assert IP(bytes(pkt))[TCP].chksum == sent


def test_a_batch_leaves_in_gso_messages_and_each_peer_gets_its_datagrams_in_order(rig):
    """Magic to transit and back through GSO: runs of same-size datagrams to one peer go as
    one message (a shorter one ends the run); every datagram still arrives alone,
    translated, in order."""
    plan = ([(MAGIC, 200)] * 3 + [(MAGIC2, 200)] + [(MAGIC, 200)] * 3 + [(MAGIC, 100)]
            + [(MAGIC, 200)] * 2)
    for seq, (dst, size) in enumerate(plan):
        rig.app.send(out(dst, seq, size, sport=40000 if dst == MAGIC else 40001))
    rig.start()
    for seq, (dst, size) in enumerate(plan):
        pid = 2 if dst == MAGIC else 3
        assert_translated(rig.remotes[pid], recv(rig.peers[pid]), T1 if dst == MAGIC else T2,
                          seq, size)
    # Counted once a batch is sent: the peer may have the last datagram a moment before.
    wait_for(lambda: rig.dp.counters()["udp_tx"] >= 10, 5, "the pump to count its sends")
    c = rig.dp.counters()
    # Messages: [3 x 200 to peer 2], [1 to peer 3], [3 x 200 + 100], [2 x 200].
    assert (c["udp_tx"], c["udp_tx_gso"], c["udp_gso_refused"]) == (10, 9, 0)
    assert c["udp_send_errors"] == 0


def test_gso_refused_by_the_kernel_sends_the_datagrams_one_by_one(rig):
    """Without UDP checksums the kernel refuses GSO (EINVAL): the batch still arrives,
    in order, and GSO is not tried again for that size."""
    if rig.overlay.family == socket.AF_INET:
        rig.overlay.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    else:  # and the receiver must accept IPv6 datagrams without a checksum
        rig.overlay.setsockopt(SOL_UDP, UDP_NO_CHECK6_TX, 1)
        rig.peers[2].setsockopt(SOL_UDP, UDP_NO_CHECK6_RX, 1)
    for seq in range(6):
        rig.app.send(out(MAGIC, seq))
    rig.start()
    for seq in range(6):
        assert_translated(rig.remotes[2], recv(rig.peers[2]), T1, seq, 200)
    for seq in range(6, 9):
        rig.app.send(out(MAGIC, seq))
    for seq in range(6, 9):
        assert_translated(rig.remotes[2], recv(rig.peers[2]), T1, seq, 200)
    wait_for(lambda: rig.dp.counters()["udp_tx"] >= 9, 5, "the pump to count its sends")
    c = rig.dp.counters()
    assert (c["udp_tx"], c["udp_tx_gso"], c["udp_gso_refused"]) == (9, 0, 1)
    assert c["udp_send_errors"] == 0


def test_coalesced_datagrams_from_a_peer_are_split_and_each_is_checked(rig):
    """A peer's GSO message reaches our GRO socket whole; each datagram in it is
    checked on its own (the spoofed one is dropped) and translated back."""
    rig.start()
    rig.app.send(out(MAGIC, 0))
    recv(rig.peers[2])  # the flow exists now

    def reply(src, seq):
        return rig.remotes[2].seal(bytes(
            IP(src=src, dst=CLIENT) / TCP(sport=443, dport=40000, seq=seq, flags="A")
            / (b"y" * 100)))

    sources = [T1, T1, "100.64.0.99", T1, T1]  # 100.64.0.99 does not route to peer 2
    dgs = [reply(src, seq) for seq, src in enumerate(sources)]
    assert len({len(d) for d in dgs}) == 1
    rig.peers[2].sendmsg([b"".join(dgs)], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", len(dgs[0])))],
                         0, rig.overlay.getsockname())
    for seq, src in enumerate(sources):
        if src != T1:
            continue
        back = IP(recv(rig.app))
        assert (back.src, back.dst, back[TCP].seq) == (MAGIC, CLIENT, seq)
    # The pump counts a batch's TUN writes once they are all made: the app may have the
    # last packet a moment before the count.
    wait_for(lambda: rig.dp.counters()["tun_tx"] >= 4, 5, "the pump to count its TUN writes")
    c = rig.dp.counters()
    assert (c["udp_rx"], c["udp_rx_gro"], c["drop_spoofed"], c["tun_tx"]) == (5, 5, 1, 4)


def test_the_control_plane_is_woken_once_per_new_event_not_per_batch(rig):
    """A flow-created event wakes the event fd; packets of that flow in later batches
    do not wake it again while the event waits; the next new flow does."""
    rig.start()
    rig.app.send(out(MAGIC, 0))
    recv(rig.peers[2])
    assert select.select([rig.dp.event_fd], [], [], 5)[0]
    os.read(rig.dp.event_fd, 8)  # reset the fd, leave the event queued
    for seq in range(1, 5):  # one batch each: the next is read only after this one's wake-up
        rig.app.send(out(MAGIC, seq))
        recv(rig.peers[2])
    assert not readable(rig.dp.event_fd)
    rig.app.send(out(MAGIC2, 5, sport=40001))
    recv(rig.peers[3])
    assert select.select([rig.dp.event_fd], [], [], 5)[0]
    events = rig.dp.read_events()
    assert [(e.kind, e.transit) for e in events] == [
        (EventKind.FLOW_CREATED, ip(T1).packed), (EventKind.FLOW_CREATED, ip(T2).packed)]
