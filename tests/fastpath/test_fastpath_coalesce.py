"""Software GRO into the TUN (coalesce.pxd): consecutive in-order TCP segments of one flow
become one GSO super-packet behind a virtio-net header; everything else is written as it
is, in order. Checked with scapy and an independent checksum (what the kernel would fill
in for NEEDS_CSUM), not with the datapath's own code."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from coalesced import coalesced_writes

A, B = "100.64.0.1", "198.51.100.10"
A6, B6 = "fd7a:115c:a1e0::1", "2001:db8::10"
MSS = 1000
OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]


def written(packets: list[bytes]) -> list[tuple[tuple[int, ...], bytes]]:
    """What the coalescing writes for `packets`: (virtio-net header fields, packet) each."""
    return [(struct.unpack("<BBHHHH", msg[:10]), msg[10:]) for msg in coalesced_writes(packets)]


def seg(seq: int, payload: bytes, *, v6: bool = False, flags: str = "A", sport: int = 4000,
        ack: int = 77, window: int = 500, options: list = OPTS, **ip: object) -> bytes:
    l3 = IPv6(src=A6, dst=B6, **ip) if v6 else IP(src=A, dst=B, flags="DF", id=seq % 65536, **ip)
    return bytes(l3 / TCP(sport=sport, dport=443, flags=flags, seq=seq, ack=ack, window=window,
                          options=options) / payload)


def data(n: int, start: int = 0) -> bytes:
    return bytes((start + i) % 251 for i in range(n))


def completed(hdr: tuple[int, ...], packet: bytes) -> bytes:
    """The packet as the kernel makes it from a NEEDS_CSUM write: the one's complement sum
    from csum_start on (the field holds the pseudo-header's sum), stored at csum_offset."""
    flags, _, _, _, start, offset = hdr
    assert flags == 1
    buf = bytearray(packet)
    body = bytes(buf[start:]) + (b"\0" if (len(buf) - start) % 2 else b"")
    s = sum(struct.unpack(f"!{len(body) // 2}H", body))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", buf, start + offset, ~s & 0xFFFF)
    return bytes(buf)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_in_order_segments_become_one_super_packet_with_valid_checksums(v6):
    segs = [seg(1000 + i * MSS, data(MSS, i * MSS), v6=v6) for i in range(5)]
    segs.append(seg(1000 + 5 * MSS, data(300, 5 * MSS), v6=v6, flags="PA"))
    [(hdr, packet)] = written(segs)
    _, gso_type, hdr_len, gso_size, start, offset = hdr
    l3 = 40 if v6 else 20
    assert (gso_type, gso_size, start, offset) == (4 if v6 else 1, MSS, l3, 16)
    assert hdr_len == l3 + 32  # TCP header with 12 bytes of options
    full = (IPv6 if v6 else IP)(completed(hdr, packet))
    assert bytes(full[TCP].payload) == data(5 * MSS + 300)
    assert full[TCP].seq == 1000 and full[TCP].flags == "PA"  # PSH of the last one kept
    assert full[TCP].options == (IPv6 if v6 else IP)(segs[0])[TCP].options
    # The checksums the kernel would see are right (scapy recomputes them independently).
    recomputed = (IPv6 if v6 else IP)(bytes(full))
    del recomputed[TCP].chksum
    if not v6:
        del recomputed[IP].chksum, recomputed[IP].len
        assert full[IP].len == len(packet) and full[IP].flags == "DF"
        assert IP(bytes(recomputed)).chksum == full[IP].chksum
    else:
        del recomputed[IPv6].plen
        assert full[IPv6].plen == len(packet) - 40
    assert (IPv6 if v6 else IP)(bytes(recomputed))[TCP].chksum == full[TCP].chksum


def test_a_lone_segment_and_non_tcp_go_as_they_are_in_order():
    udp = bytes(IP(src=A, dst=B) / UDP(sport=5, dport=53) / b"q")
    one = seg(1000, data(MSS))
    out = written([one, udp, seg(5000, data(MSS)), seg(6000, data(MSS))])
    assert [h for h, _ in out] == [(0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0),
                                   (1, 1, 52, MSS, 20, 16)]
    assert [p for _, p in out[:2]] == [one, udp]
    assert bytes(IP(completed(*out[2]))[TCP].payload) == data(MSS) * 2


@pytest.mark.parametrize("second", [
    pytest.param(dict(seq=3000), id="a gap"),
    pytest.param(dict(seq=1000), id="a retransmission"),
    pytest.param(dict(ack=78), id="another ack"),
    pytest.param(dict(window=501), id="another window"),
    pytest.param(dict(sport=4001), id="another flow"),
    pytest.param(dict(flags="FA"), id="FIN"),
    pytest.param(dict(flags="SA"), id="SYN"),
    pytest.param(dict(flags="RA"), id="RST"),
    pytest.param(dict(flags="AU"), id="URG"),
    pytest.param(dict(flags="AE"), id="ECE"),
    pytest.param(dict(options=[("NOP", None), ("NOP", None), ("Timestamp", (1001, 2000))]),
                 id="other options"),
    pytest.param(dict(ttl=9), id="another TTL"),
    pytest.param(dict(tos=4), id="another TOS"),
    pytest.param(dict(payload=data(MSS + 1)), id="longer than the first"),
])
def test_what_may_not_be_joined_is_not(second):
    seq = second.pop("seq", 1000 + MSS)
    payload = second.pop("payload", data(MSS))
    first, other = seg(1000, data(MSS)), seg(seq, payload, **second)
    out = written([first, other])
    assert [p for _, p in out] == [first, other]
    assert all(h == (0, 0, 0, 0, 0, 0) for h, _ in out)


def test_a_short_segment_or_psh_ends_the_super_packet():
    out = written([seg(1000, data(MSS)), seg(2000, data(500)), seg(2500, data(MSS)),
                   seg(3500, data(MSS), flags="PA"), seg(4500, data(MSS))])
    assert [(h[1], len(IP(p)[TCP].payload)) for h, p in out] == [
        (1, MSS + 500), (1, 2 * MSS), (0, MSS)]


def test_fragments_and_ip_options_are_not_joined():
    frag = bytes(IP(src=A, dst=B, flags="MF", id=5) / TCP(sport=4000, dport=443, flags="A",
                                                         seq=1000) / data(MSS))
    nodf = bytes(IP(src=A, dst=B, id=6) / TCP(sport=4000, dport=443, flags="A", seq=1000)
                 / data(MSS))
    opts = bytes(IP(src=A, dst=B, flags="DF", options=[b"\x01\x01\x01\x00"])
                 / TCP(sport=4000, dport=443, flags="A", seq=1000) / data(MSS))
    for pkt in (frag, nodf, opts):
        follow = seg(1000 + MSS, data(MSS), options=[])
        assert [p for _, p in written([pkt, follow])] == [pkt, follow]


def test_at_most_64_segments_and_64_kib_in_one_super_packet():
    out = written([seg(1000 + i * MSS, data(MSS)) for i in range(70)])
    assert [h[1] for h, _ in out] == [1, 1]
    assert [len(IP(completed(*o))[TCP].payload) // MSS for o in out] == [64, 6]
    big = 16000
    out = written([seg(1000 + i * big, data(big)) for i in range(5)])
    assert all(len(p) <= 65535 for _, p in out)
    assert sum(len(IP(completed(h, p) if h[0] else p)[TCP].payload) for h, p in out) == 5 * big


def test_a_payload_less_ack_is_written_alone():
    ack = bytes(IP(src=A, dst=B, flags="DF") / TCP(sport=4000, dport=443, flags="A", seq=1000))
    assert written([ack, ack]) == [((0,) * 6, ack), ((0,) * 6, ack)]
    assert Raw not in IP(ack)


def test_interleaved_flows_are_joined_only_in_their_consecutive_runs():
    """Segments of two flows that take turns: each run of one flow's consecutive
    segments becomes its own super-packet, in the order they came, and no byte of one
    flow ends up in the other's (the kernel's GRO would hold both flows at once; joining
    only consecutive runs keeps every write in arrival order)."""
    a = [seg(1000 + i * MSS, data(MSS, i * MSS)) for i in range(4)]
    b = [seg(5000 + i * MSS, data(MSS, 100 + i * MSS), sport=4001) for i in range(4)]
    out = written([a[0], a[1], b[0], b[1], a[2], b[2], b[3], a[3]])
    got = []
    for hdr, packet in out:
        full = IP(completed(hdr, packet)) if hdr[0] else IP(packet)
        got.append((full[TCP].sport, full[TCP].seq, bytes(full[TCP].payload)))
    assert got == [
        (4000, 1000, data(2 * MSS)),
        (4001, 5000, data(2 * MSS, 100)),
        (4000, 1000 + 2 * MSS, data(MSS, 2 * MSS)),
        (4001, 5000 + 2 * MSS, data(2 * MSS, 100 + 2 * MSS)),
        (4000, 1000 + 3 * MSS, data(MSS, 3 * MSS)),
    ]
