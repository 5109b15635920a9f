"""TUN offloads through the TUN -> UDP pump, without root: super-packets read behind a
virtio-net header (as a TUN with TUNSETOFFLOAD hands them over) are translated once,
split, sealed and sent as UDP GSO runs; what the peer opens is, datagram for datagram,
the segments the kernel would have sent, built here with scapy. A unix datagram
socketpair stands in for the TUN device (test_fastpath_pump_batching.py does the same).

Super-packets are queued before the pumps start, so the TUN pump reads them in one batch
and the cases where the segment area or the send batch fills up mid-batch are reached.
"""

from __future__ import annotations

import select
import struct
import time

from pumpnet import SocketRig, force_buffers, ip, rig_fixture
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop

import wgsessions
from conn25.core.iprange import IPRange
from conn25.fastpath import Datapath, monotonic_ms

CLIENT, CONNECTOR, MAGIC, TRANSIT = "100.64.0.1", "100.64.0.2", "100.80.0.5", "169.254.128.5"
CLIENT6, CONNECTOR6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
MAGIC6, TRANSIT6 = "fd7a:115c:a1e0:ab12::5", "fd7a:115c:a1e0:ab13::5"
NEEDS_CSUM, TCPV4, TCPV6 = 1, 1, 4



def tcp(payload: bytes, *, v6: bool, seq: int, flags: str = "A", ip_id: int = 1,
        dst: str | None = None, sport: int = 40000) -> bytes:
    l3 = (IPv6(src=CLIENT6, dst=dst or MAGIC6) if v6 else
          IP(src=CLIENT, dst=dst or MAGIC, id=ip_id, flags="DF"))
    return bytes(l3 / TCP(sport=sport, dport=443, seq=seq, ack=1, flags=flags, window=1000)
                 / payload)


def as_read(full: bytes, mss: int) -> bytes:
    """A super-packet as a TUN with offloads hands it over: virtio-net header (GSO, partial
    checksum), then the packet with the pseudo-header sum in the TCP checksum field."""
    v6 = full[0] >> 4 == 6
    l3 = 40 if v6 else 20
    words = (full[8:40] if v6 else full[12:20]) + struct.pack("!HH", 6, len(full) - l3)
    s = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    packet = full[:l3 + 16] + struct.pack("!H", s) + full[l3 + 18:]
    hdr = struct.pack("<BBHHHH", NEEDS_CSUM, TCPV6 if v6 else TCPV4, len(full), mss, l3, 16)
    return hdr + packet


def segments(payload: bytes, mss: int, *, v6: bool, seq: int, ip_id: int,
             flags: str = "PA") -> list[bytes]:
    """What the peer must get: the kernel's segments of the super-packet, translated."""
    out = []
    for i in range(0, len(payload), mss):
        last = i + mss >= len(payload)
        out.append(tcp(payload[i:i + mss], v6=v6, seq=(seq + i) % 2**32,
                       ip_id=(ip_id + i // mss) % 65536,
                       flags=flags if last else flags.replace("P", "").replace("F", ""),
                       dst=TRANSIT6 if v6 else TRANSIT))
    return out


class Rig(SocketRig):
    """A client datapath on a TUN stand-in with virtio-net headers; MAGIC -> TRANSIT at
    peer 2, whose end of the session the test plays on a loopback socket."""

    def __init__(self) -> None:
        super().__init__(Datapath(client=True))
        for s in (self.kernel, self.tun, self.peer):
            force_buffers(s)
        t = self.dp.tables
        t.set_local([ip(CLIENT), ip(CLIENT6)])
        t.set_peer(2, ip("127.0.0.1"), self.peer.getsockname()[1],
                   [ip(CONNECTOR), ip(CONNECTOR6)])
        t.set_magic_ranges([IPRange.parse("100.80.0.0/16"),
                            IPRange.parse("fd7a:115c:a1e0:ab12::/64")])
        t.set_magic(ip(MAGIC), ip(TRANSIT))
        t.set_magic(ip(MAGIC6), ip(TRANSIT6))
        t.set_route(ip(TRANSIT), 2)
        t.set_route(ip(TRANSIT6), 2)
        self.remote = wgsessions.connect(self.dp, 2, monotonic_ms())

    def start(self) -> None:
        self.dp.start(self.tun.fileno(), self.overlay, vnet_hdr=True)

    def received(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """The packets inside the next `count` datagrams the peer gets."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.peer], [], [], max(left, 0))
            assert ready, f"{len(out)} of {count} datagrams arrived"
            out.append(self.remote.open(self.peer.recv(70000)))
        return out


rig = rig_fixture(Rig)


def wait_counters(dp: Datapath, **want: int) -> dict:
    deadline = time.monotonic() + 5
    while True:
        c = dp.counters()
        if all(c[k] >= v for k, v in want.items()) or time.monotonic() > deadline:
            return c
        time.sleep(0.01)


def test_super_packets_are_split_translated_and_sent_as_gso_runs_past_a_full_area(rig):
    """Ten 60 KB super-packets in one batch: more segments than the segment area holds,
    so the batch is sent part-way and goes on; each segment arrives as its own datagram,
    in order, translated, exactly as the kernel would have cut it."""
    mss, size, n = 1400, 60_000, 10
    want = []
    for k in range(n):
        payload = bytes((k + i) % 251 for i in range(size))
        seq, ip_id = 1000 + k * size, 7 + k * 43
        rig.kernel.send(as_read(tcp(payload, v6=False, seq=seq, ip_id=ip_id, flags="PA"), mss))
        want += segments(payload, mss, v6=False, seq=seq, ip_id=ip_id)
    rig.start()
    assert rig.received(len(want)) == want
    c = wait_counters(rig.dp, udp_tx=len(want))
    assert (c["tun_rx"], c["tun_rx_super_packets"], c["tun_rx_segments"]) == (n, n, len(want))
    assert c["udp_tx"] == len(want) and c["udp_tx_gso"] == len(want)
    assert c["translated"] == n and c["flows_created"] == 1  # one lookup per super-packet


def test_small_segments_fill_the_send_batch_and_take_several_gso_messages(rig):
    """IPv6, 100-byte segments: a super-packet is more datagrams than one GSO message may
    hold, and three of them more than a send batch."""
    mss, size, n = 100, 20_000, 3
    want = []
    for k in range(n):
        payload = bytes((k * 3 + i) % 251 for i in range(size))
        seq = 2**32 - 5000 + k * size  # wraps
        rig.kernel.send(as_read(tcp(payload, v6=True, seq=seq % 2**32, flags="PA"), mss))
        want += segments(payload, mss, v6=True, seq=seq, ip_id=0)
    rig.start()
    assert rig.received(len(want)) == want
    c = wait_counters(rig.dp, udp_tx=len(want))
    assert (c["tun_rx_super_packets"], c["tun_rx_segments"], c["udp_tx"]) == (n, 600, 600)


def test_bad_super_packets_are_dropped_by_reason_and_partial_checksums_completed(rig):
    good = tcp(b"x" * 3000, v6=False, seq=5, flags="A")
    bad_type = struct.pack("<BBHHHH", NEEDS_CSUM, 3, 0, 1000, 20, 16) + good  # UFO
    bad_len = as_read(good, 1000)[:-1]  # IPv4 total length says one more byte
    ext6 = (struct.pack("<BBHHHH", 0, TCPV6, 0, 1000, 0, 0)
            + bytes(IPv6(src=CLIENT6, dst=MAGIC6) / IPv6ExtHdrHopByHop()
                    / TCP(sport=1, dport=443) / (b"y" * 3000)))
    # Not GSO, partial checksum: completed before the translation fixes it.
    small = tcp(b"z" * 300, v6=False, seq=9, flags="PA", sport=40001)
    partial = bytearray(as_read(small, 0))
    partial[1] = 0  # gso_type none
    for msg in (bad_type, bad_len, ext6, bytes(partial)):
        rig.kernel.send(msg)
    rig.start()
    [got] = rig.received(1)
    assert got == tcp(b"z" * 300, v6=False, seq=9, flags="PA", sport=40001, dst=TRANSIT)
    c = wait_counters(rig.dp, drop_offload_header=1, drop_offload_packet=1,
                      drop_offload_unsupported=1)
    assert (c["drop_offload_header"], c["drop_offload_packet"],
            c["drop_offload_unsupported"], c["tun_rx"], c["udp_tx"]) == (1, 1, 1, 1, 1)
    assert c["tun_rx_super_packets"] == 0
