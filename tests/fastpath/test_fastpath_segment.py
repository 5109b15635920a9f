"""TUN offloads on reads (segment.pxd): a TSO/USO super-packet read behind a virtio-net
header is split into the packets the kernel would have sent, and a partial checksum is
completed. Every expected packet is built independently with scapy (its own lengths and
checksums), and compared byte for byte."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_EOL, IPOption_NOP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop

from conn25._fastpath import _test_segment

A, B, T = "100.64.0.1", "198.51.100.10", "169.254.128.7"
A6, B6, T6 = "fd7a:115c:a1e0::1", "2001:db8::10", "fd7a:115c:a1e0:ab13::7"
OPTS = [("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]
NEEDS_CSUM, TCPV4, TCPV6, UDP_L4 = 1, 1, 4, 5


def data(n: int, start: int = 0) -> bytes:
    return bytes((start * 7 + i) % 251 for i in range(n))


def vnet(gso_type: int = 0, gso_size: int = 0, csum_start: int = 0, csum_offset: int = 0,
         flags: int = NEEDS_CSUM, hdr_len: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_sum(packet: bytes) -> int:
    """The folded pseudo-header sum of an IP packet's TCP/UDP part (what the kernel puts in
    the checksum field of a CHECKSUM_PARTIAL packet), computed here from first principles."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        words = packet[12:20] + struct.pack("!HH", packet[9], len(packet) - ihl)
    else:
        words = packet[8:40] + struct.pack("!HH", packet[6], len(packet) - 40)
    return fold(sum(struct.unpack(f"!{len(words) // 2}H", words)))


def as_read(full: bytes, proto: str) -> bytes:
    """`full` (checksums complete) as the kernel hands it to a TUN with offloads: the L4
    checksum field holding only the pseudo-header sum."""
    buf = bytearray(full)
    l3 = (buf[0] & 15) * 4 if buf[0] >> 4 == 4 else 40
    struct.pack_into("!H", buf, l3 + (16 if proto == "tcp" else 6), pseudo_sum(full))
    return bytes(buf)


def tcp(payload: bytes, *, v6: bool = False, seq: int = 1000, flags: str = "A", ip_id: int = 7,
        src: str | None = None, dst: str | None = None, ip_options: list | None = None) -> bytes:
    if v6:
        l3 = IPv6(src=src or A6, dst=dst or B6, tc=0x10, fl=0x12345, hlim=61)
    else:
        l3 = IP(src=src or A, dst=dst or B, id=ip_id, flags="DF", tos=0x10, ttl=61,
                options=ip_options or [])
    return bytes(l3 / TCP(sport=40000, dport=443, seq=seq, ack=77, flags=flags, window=500,
                          options=OPTS) / payload)


def udp(payload: bytes, *, v6: bool = False, ip_id: int = 7, src: str | None = None,
        dst: str | None = None, chksum: int | None = None) -> bytes:
    l3 = IPv6(src=src or A6, dst=dst or B6) if v6 else IP(src=src or A, dst=dst or B, id=ip_id)
    return bytes(l3 / UDP(sport=5000, dport=4433, chksum=chksum) / payload)


def expected_tcp(payload: bytes, mss: int, *, v6: bool = False, seq: int = 1000,
                 flags: str = "A", ip_id: int = 7, **kw: object) -> list[bytes]:
    """The segments tcp_gso_segment makes: FIN/PSH on the last, CWR on the first, the
    sequence number and (IPv4) ID advancing."""
    pieces = [payload[i:i + mss] for i in range(0, len(payload), mss)]
    out = []
    for i, piece in enumerate(pieces):
        f = flags
        if i < len(pieces) - 1:
            f = f.replace("F", "").replace("P", "")
        if i > 0:
            f = f.replace("C", "")
        out.append(tcp(piece, v6=v6, seq=(seq + i * mss) % 2**32, flags=f,
                       ip_id=(ip_id + i) % 65536, **kw))
    return out


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("flags", ["A", "PA", "FPA", "CA", "CPA"])
def test_tcp_super_packet_splits_as_the_kernel_would(v6, flags):
    mss, payload = 1000, data(5 * 1000 + 300)
    l3 = 40 if v6 else 20
    super_packet = as_read(tcp(payload, v6=v6, flags=flags), "tcp")
    hdr = vnet(TCPV6 if v6 else TCPV4, mss, l3, 16, hdr_len=l3 + 32)
    segs = _test_segment(hdr, super_packet)
    assert segs == expected_tcp(payload, mss, v6=v6, flags=flags)
    assert len(segs) == 6 and len(segs[-1]) == l3 + 32 + 300  # the last one shorter
    # Independently of scapy's construction: every checksum verifies on what came out.
    ip = IPv6 if v6 else IP
    for s in segs:
        parsed = ip(s)
        del parsed[TCP].chksum
        assert ip(bytes(parsed))[TCP].chksum == ip(s)[TCP].chksum


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_payload_a_multiple_of_the_segment_size_and_wrapping_counters(v6):
    mss, payload = 1200, data(4 * 1200)
    seq, ip_id = 2**32 - 1500, 65534
    super_packet = as_read(tcp(payload, v6=v6, seq=seq, ip_id=ip_id, flags="PA"), "tcp")
    segs = _test_segment(vnet(TCPV6 if v6 else TCPV4, mss, 40 if v6 else 20, 16), super_packet)
    assert segs == expected_tcp(payload, mss, v6=v6, seq=seq, ip_id=ip_id, flags="PA")
    assert [TCP in (IPv6 if v6 else IP)(s) and (IPv6 if v6 else IP)(s)[TCP].seq for s in segs] \
        == [2**32 - 1500, 2**32 - 300, 900, 2100]
    if not v6:
        assert [IP(s).id for s in segs] == [65534, 65535, 0, 1]


def test_ipv4_options_are_copied_to_every_segment():
    opts = [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()]
    payload = data(2500)
    super_packet = as_read(tcp(payload, ip_options=opts), "tcp")
    assert super_packet[0] == 0x46
    segs = _test_segment(vnet(TCPV4, 1000, 24, 16), super_packet)
    assert segs == expected_tcp(payload, 1000, ip_options=opts)


def test_segment_size_beyond_the_payload_gives_the_packet_with_its_checksum_completed():
    full = tcp(data(700), flags="PA")
    assert _test_segment(vnet(TCPV4, 1400, 20, 16), as_read(full, "tcp")) == [full]


def test_no_needs_csum_on_a_super_packet_still_gives_full_checksums():
    payload = data(3000)
    segs = _test_segment(vnet(TCPV4, 1000, flags=0), tcp(payload))
    assert segs == expected_tcp(payload, 1000)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_super_packet_becomes_datagrams(v6):
    size, payload = 1200, data(3 * 1200 + 17)
    l3 = 40 if v6 else 20
    super_packet = as_read(udp(payload, v6=v6), "udp")
    segs = _test_segment(vnet(UDP_L4, size, l3, 6), super_packet)
    want = [udp(payload[i:i + size], v6=v6, ip_id=7 + i // size)
            for i in range(0, len(payload), size)]
    assert segs == want
    assert [len(s) - l3 - 8 for s in segs] == [1200, 1200, 1200, 17]


def test_ipv4_udp_without_checksum_keeps_none():
    payload = data(2500)
    segs = _test_segment(vnet(UDP_L4, 1000, flags=0), udp(payload, chksum=0))
    assert [struct.unpack_from("!H", s, 26)[0] for s in segs] == [0, 0, 0]
    assert segs == [udp(payload[i:i + 1000], ip_id=7 + i // 1000, chksum=0)
                    for i in range(0, 2500, 1000)]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_partial_checksum_is_completed(v6, proto):
    full = tcp(data(333), v6=v6, flags="PA") if proto == "tcp" else udp(data(333), v6=v6)
    l3 = 40 if v6 else 20
    read = as_read(full, proto)
    assert read != full
    assert _test_segment(vnet(0, 0, l3, 16 if proto == "tcp" else 6), read) == [full]


def test_a_plain_packet_passes_untouched():
    for packet in (tcp(data(100)), b"\x45 not even a packet", b""):
        assert _test_segment(vnet(flags=0), packet) == [packet]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_nat_on_the_super_packet_then_split_gives_valid_segments(v6):
    """The pump translates a super-packet once (dp_from_tun) and splits it afterwards:
    the address change moves every segment's checksum, which comes out right."""
    mss, payload = 1000, data(4321)
    l3 = 40 if v6 else 20
    super_packet = as_read(tcp(payload, v6=v6, flags="FPA"), "tcp")
    new_dst = T6 if v6 else T
    segs = _test_segment(vnet(TCPV6 if v6 else TCPV4, mss, l3, 16), super_packet,
                         translate=("dst", ipaddress.ip_address(new_dst).packed))
    want = expected_tcp(payload, mss, v6=v6, flags="FPA", dst=new_dst)
    assert segs == want
    untranslated = expected_tcp(payload, mss, v6=v6, flags="FPA")
    pairs = zip(segs, untranslated, strict=True)
    assert all(s[l3 + 16:l3 + 18] != u[l3 + 16:l3 + 18] for s, u in pairs)


def _v4_with(**fields: object) -> bytes:
    return as_read(tcp(data(3000), **fields), "tcp")


def _patched(packet: bytes, at: int, value: bytes) -> bytes:
    return packet[:at] + value + packet[at + len(value):]


GOOD4 = _v4_with()
GOOD6 = as_read(tcp(data(3000), v6=True), "tcp")
MALFORMED = {
    "unknown gso type (UFO)": (vnet(3, 1000, 20, 16), GOOD4, "header"),
    "unknown flag": (vnet(TCPV4, 1000, 20, 16, flags=NEEDS_CSUM | 4), GOOD4, "header"),
    "gso_size 0": (vnet(TCPV4, 0, 20, 16), GOOD4, "header"),
    "csum_start not the TCP header": (vnet(TCPV4, 1000, 24, 16), GOOD4, "header"),
    "csum_offset not TCP's": (vnet(TCPV4, 1000, 20, 6), GOOD4, "header"),
    "ECN with UDP": (vnet(UDP_L4 | 0x80, 1000, 20, 6), as_read(udp(data(3000)), "udp"), "header"),
    "ECN without GSO": (vnet(0x80, 0, flags=0), GOOD4, "header"),
    "partial checksum beyond the packet": (vnet(0, 0, 20, 5000), GOOD4, "header"),
    "partial checksum start beyond it": (vnet(0, 0, 4000, 0), GOOD4, "header"),
    "TCPV4 on IPv6": (vnet(TCPV4, 1000, 40, 16), GOOD6, "packet"),
    "TCPV6 on IPv4": (vnet(TCPV6, 1000, 20, 16), GOOD4, "packet"),
    "UDP under TCPV4": (vnet(TCPV4, 1000, 20, 6), as_read(udp(data(3000)), "udp"), "packet"),
    "TCP under UDP_L4": (vnet(UDP_L4, 1000, 20, 16), GOOD4, "packet"),
    "IPv4 total length short": (vnet(TCPV4, 1000, 20, 16), GOOD4 + b"x", "packet"),
    "IPv4 total length long": (vnet(TCPV4, 1000, 20, 16), GOOD4[:-1], "packet"),
    "IPv6 payload length short": (vnet(TCPV6, 1000, 40, 16), GOOD6 + b"x", "packet"),
    "IPv4 fragment": (vnet(TCPV4, 1000, 20, 16), _patched(GOOD4, 6, b"\x20\x00"), "packet"),
    "IHL below 5": (vnet(TCPV4, 1000, 20, 16), _patched(GOOD4, 0, b"\x44"), "packet"),
    "version 5": (vnet(TCPV4, 1000, 20, 16), _patched(GOOD4, 0, b"\x55"), "packet"),
    "TCP data offset below 5": (vnet(TCPV4, 1000, 20, 16), _patched(GOOD4, 32, b"\x40"),
                                "packet"),
    "no payload": (vnet(TCPV4, 1000, 20, 16), as_read(tcp(b""), "tcp"), "packet"),
    "headers only, cut short": (vnet(TCPV4, 1000, 20, 16), b"\x45\x00\x00\x10" + bytes(12),
                                "packet"),
    "UDP length not the packet's": (vnet(UDP_L4, 1000, 20, 6),
                                    _patched(as_read(udp(data(3000)), "udp"), 24, b"\x01\x00"),
                                    "packet"),
    "IPv6 extension header": (vnet(TCPV6, 1000, 48, 16),
                              bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop()
                                    / TCP(sport=1, dport=2) / data(3000)), "unsupported"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_what_cannot_be_honoured_is_dropped_with_a_reason(case):
    hdr, packet, reason = MALFORMED[case]
    assert _test_segment(hdr, packet) == reason


def test_a_header_of_the_wrong_size_is_a_caller_error():
    with pytest.raises(ValueError, match="10 bytes"):
        _test_segment(b"\0" * 12, GOOD4)
