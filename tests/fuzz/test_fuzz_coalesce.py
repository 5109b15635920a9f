"""Fuzzing the software GRO into the TUN (coalesce.pxd) with what an authenticated peer may
send in one receive batch: TCP segments of a few flows, in and out of order, of any length
and flags, mixed with other packets and with bytes that are no packet at all.

The property: what is written, with every super-packet split again at its segment size as
the kernel would, is exactly what came in, in the same order; a super-packet only ever
joins segments that follow each other in one flow. CONN25_FUZZ_EXAMPLES sets the count.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from coalesced import coalesced_writes

FUZZ = settings(max_examples=int(os.environ.get("CONN25_FUZZ_EXAMPLES", "1000")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow])
SRC, DST = "100.64.0.1", "198.51.100.10"


def split(msg: bytes) -> list[bytes]:
    """A written message as the packets it stands for: a GSO super-packet cut at its
    segment size, headers copied, lengths and sequence numbers set (the payload bytes
    are what the property compares)."""
    flags, gso_type, hdr_len, gso_size, _, _ = struct.unpack("<BBHHHH", msg[:10])
    packet = msg[10:]
    if gso_type == 0:
        return [packet]
    assert flags == 1 and gso_type == 1 and gso_size > 0
    head, payload = packet[:hdr_len], packet[hdr_len:]
    assert len(payload) > gso_size  # two segments at least
    seq = struct.unpack_from("!I", head, 24)[0]
    out = []
    for off in range(0, len(payload), gso_size):
        piece = bytearray(head + payload[off:off + gso_size])
        struct.pack_into("!H", piece, 2, len(piece))  # IPv4 total length
        struct.pack_into("!I", piece, 24, (seq + off) & 0xFFFFFFFF)
        out.append(bytes(piece))
    return out


def essence(packet: bytes) -> tuple:
    """What must survive the join: for TCP the flow, sequence number and payload; for
    anything else the bytes themselves."""
    try:
        p = IP(packet)
    except Exception:  # not a packet at all: its bytes must come back
        return ("raw", packet)
    if TCP in p and p.proto == 6 and p.ihl == 5 and p.len == len(packet):
        return ("tcp", p.sport, p.dport, p[TCP].seq, bytes(p[TCP].payload))
    return ("raw", packet)


segment = st.builds(
    lambda sport, seq, n, flags, ttl, df: bytes(
        IP(src=SRC, dst=DST, ttl=ttl, flags="DF" if df else 0)
        / TCP(sport=sport, dport=443, seq=seq, ack=1, flags=flags, window=100)
        / bytes((seq + i) % 256 for i in range(n))),
    st.sampled_from([4000, 4001]), st.integers(0, 6000), st.sampled_from([0, 100, 500, 1000]),
    st.sampled_from(["A", "A", "A", "PA", "FA", "SA", "R"]), st.sampled_from([64, 64, 63]),
    st.sampled_from([True, True, True, False]))
in_order = st.builds(
    lambda sport, start, sizes: [
        bytes(IP(src=SRC, dst=DST, flags="DF")
              / TCP(sport=sport, dport=443, seq=(start + sum(sizes[:i])) & 0xFFFFFFFF, ack=1,
                    flags="A", window=100) / bytes(n))
        for i, n in enumerate(sizes)],
    st.sampled_from([4000, 4001]), st.integers(0, 2**32 - 1),
    st.lists(st.sampled_from([1000, 1000, 1000, 400]), min_size=1, max_size=80))
other = st.one_of(
    st.binary(min_size=1, max_size=80),
    st.just(bytes(IP(src=SRC, dst=DST) / UDP(sport=5, dport=53) / b"q")))


@FUZZ
@given(st.lists(st.one_of(segment, other, in_order.map(tuple)), max_size=12))
def test_what_is_written_is_what_came_in_in_order(items):
    packets = [p for item in items for p in (item if isinstance(item, tuple) else [item])]
    out = [piece for msg in coalesced_writes(packets) for piece in split(msg)]
    assert [essence(p) for p in out] == [essence(p) for p in packets]
    assert all(len(p) <= 65535 for p in out)
