"""Fuzzing the split of TUN super-packets (segment.pxd) with whatever the kernel (or a
bug in it) could hand us: any virtio-net header before any bytes, valid super-packets, and
valid ones with bytes flipped.

Properties: nothing crashes, every answer is a list of packets or a drop reason; for a
valid super-packet the segments carry the original payload in order, each at most
gso_size of it, with consecutive sequence numbers and checksums that verify (computed
here, independently). CONN25_FUZZ_EXAMPLES sets the count.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from conn25._fastpath import _test_segment

FUZZ = settings(max_examples=int(os.environ.get("CONN25_FUZZ_EXAMPLES", "1000")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow])
REASONS = {"header", "packet", "unsupported"}


def ones_sum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def l4_checksum_ok(packet: bytes) -> bool:
    """Whether the TCP/UDP checksum of an IP packet (no extension headers) verifies."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        pseudo = packet[12:20] + struct.pack("!HH", packet[9], len(packet) - ihl)
        if ones_sum(packet[:ihl]) != 0xFFFF:
            return False
    else:
        ihl = 40
        pseudo = packet[8:40] + struct.pack("!HH", packet[6], len(packet) - 40)
    return ones_sum(pseudo + packet[ihl:]) == 0xFFFF


@st.composite
def super_packets(draw: st.DrawFn) -> tuple[bytes, bytes, bytes, int, int]:
    """(virtio-net header, super-packet, payload, gso_size, header length)."""
    v6 = draw(st.booleans())
    is_tcp = draw(st.booleans())
    payload = draw(st.binary(min_size=1, max_size=9000))
    gso_size = draw(st.integers(1, 3000))
    l3 = IPv6(src="fd7a:115c:a1e0::1", dst="2001:db8::1") if v6 else \
        IP(src="100.64.0.1", dst="198.51.100.1", id=draw(st.integers(0, 65535)))
    if is_tcp:
        l4 = TCP(sport=1000, dport=443, seq=draw(st.integers(0, 2**32 - 1)),
                 flags=draw(st.sampled_from(["A", "PA", "FPA", "CA", "EA"])),
                 options=draw(st.sampled_from([[], [("NOP", None)] * 4])))
    else:
        l4 = UDP(sport=1000, dport=53)
    packet = bytes(l3 / l4 / payload)
    hlen = len(packet) - len(payload)
    iplen = 40 if v6 else 20
    gso_type = (4 if v6 else 1) if is_tcp else 5
    hdr = struct.pack("<BBHHHH", 1, gso_type, hlen, gso_size, iplen, 16 if is_tcp else 6)
    return hdr, packet, payload, gso_size, hlen


@FUZZ
@given(st.binary(min_size=10, max_size=10), st.binary(max_size=3000))
def test_any_bytes_behind_any_header_never_crash(hdr, packet):
    out = _test_segment(hdr, packet)
    assert (isinstance(out, str) and out in REASONS) or (isinstance(out, list) and out)


@FUZZ
@given(super_packets())
def test_valid_super_packets_rejoin_to_their_payload(case):
    hdr, packet, payload, gso_size, hlen = case
    segs = _test_segment(hdr, packet)
    assert isinstance(segs, list)
    assert len(segs) == -(-len(payload) // gso_size)
    assert b"".join(s[hlen:] for s in segs) == payload
    assert all(len(s) - hlen <= gso_size for s in segs)
    assert all(l4_checksum_ok(s) for s in segs)
    if hdr[1] != 5:  # TCP: the header starts right after the fixed IP header
        at = (20 if packet[0] >> 4 == 4 else 40) + 4
        seqs = [struct.unpack_from("!I", s, at)[0] for s in segs]
        assert seqs == [(seqs[0] + i * gso_size) % 2**32 for i in range(len(segs))]
        assert seqs[0] == struct.unpack_from("!I", packet, at)[0]


@FUZZ
@given(super_packets(), st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)),
                                 min_size=1, max_size=4))
def test_damaged_super_packets_are_split_or_dropped_never_crash(case, flips):
    hdr, packet, _, _, _ = case
    raw = bytearray(hdr + packet)
    for at, value in flips:
        raw[at % len(raw)] = value
    out = _test_segment(bytes(raw[:10]), bytes(raw[10:]))
    assert (isinstance(out, str) and out in REASONS) or (isinstance(out, list) and out)
    if isinstance(out, list) and len(out) > 1:
        assert all(len(s) <= 65535 for s in out)
