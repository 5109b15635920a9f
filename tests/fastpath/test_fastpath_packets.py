"""Packet parsing, checksum-fixing NAT, ICMP error translation, fragment tracking and
ICMP unreachable generation in the compiled datapath.

Every expected packet is built from scratch by scapy with the translated addresses, so
each checksum we fix incrementally is compared with scapy's independent full computation.
"""

from __future__ import annotations

import ctypes
import ipaddress
import mmap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    fragment,
    fragment6,
    raw,
)

from conn25 import _fastpath
from conn25.fastpath import icmp_unreachable, internet_checksum, parse_packet

# The extension's test probes (its testing include), under their old names.
nat_rewrite = _fastpath._test_nat_rewrite
nat_rewrite_icmp_inner = _fastpath._test_nat_rewrite_icmp_inner
nat_translate = _fastpath._test_nat_translate
parse_status = _fastpath._test_parse_status
FragTracker = _fastpath._TestFragTracker

# Documentation and reserved addresses: client overlay, magic, transit, real server, a router
# On the path.
C4, C6 = "100.64.0.1", "fd7a:115c:a1e0::1"
M4, M6 = "100.80.0.5", "fd7a:115c:a1e0:ab12::5"
T4, T6 = "169.254.128.7", "fd7a:115c:a1e0:ab13::7"
R4, R6 = "203.0.113.10", "2001:db8::10"
X4, X6 = "198.51.100.1", "2001:db8:ffff::1"
ADDR = {
    4: {"C": C4, "M": M4, "T": T4, "R": R4, "X": X4},
    6: {"C": C6, "M": M6, "T": T6, "R": R6, "X": X6},
}


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def l4(
    family: int, kind: str, sport: int = 40000, dport: int = 443, payload: bytes = b"hello", **kw
):
    """An upper-layer header (scapy computes every checksum when the packet is built)."""
    if kind == "tcp":
        return TCP(sport=sport, dport=dport, seq=1000, flags="S", **kw) / Raw(payload)
    if kind == "udp":
        return UDP(sport=sport, dport=dport, **kw) / Raw(payload)
    if kind in ("echo", "echo_reply"):
        if family == 4:
            return ICMP(type=8 if kind == "echo" else 0, id=sport, seq=7) / Raw(payload)
        cls = ICMPv6EchoRequest if kind == "echo" else ICMPv6EchoReply
        return cls(id=sport, seq=7, data=payload)
    raise AssertionError(kind)


def ip(family: int, src: str, dst: str, **kw):
    return IP(src=src, dst=dst, **kw) if family == 4 else IPv6(src=src, dst=dst, **kw)


def pkt(family: int, src: str, dst: str, kind: str, **kw) -> bytes:
    return raw(ip(family, src, dst) / l4(family, kind, **kw))


def icmp_error(family: int, src: str, dst: str, kind: str, quote: bytes) -> bytes:
    """An ICMP error (frag-needed / packet-too-big / port-unreachable / time-exceeded)."""
    if family == 4:
        head = {
            "frag_needed": ICMP(type=3, code=4, nexthopmtu=1400),
            "port_unreach": ICMP(type=3, code=3),
            "time_exceeded": ICMP(type=11, code=0),
        }[kind]
    else:
        head = {
            "frag_needed": ICMPv6PacketTooBig(mtu=1280),
            "port_unreach": ICMPv6DestUnreach(code=4),
            "time_exceeded": ICMPv6TimeExceeded(code=0),
        }[kind]
    return raw(ip(family, src, dst) / head / Raw(quote))


# ---- a buffer whose end is the end of readable memory: reading past n faults ----


class GuardedTail:
    """Places data so that its last byte is followed by a PROT_NONE page."""

    def __init__(self) -> None:
        self.page = mmap.PAGESIZE
        self.mem = mmap.mmap(-1, 2 * self.page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(base + self.page, self.page, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")

    def at_end(self, data: bytes) -> memoryview:
        assert len(data) <= self.page
        start = self.page - len(data)
        self.mem[start : self.page] = data
        return memoryview(self.mem)[start : self.page]


GUARD = GuardedTail()


def guarded_parse(data: bytes) -> tuple[str, dict | None]:
    view = GUARD.at_end(data)
    try:
        return parse_status(view), parse_packet(view)
    finally:
        view.release()


# ---- parsing ----


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_parse_tcp_udp_five_tuple(family, kind):
    a = ADDR[family]
    d = parse_packet(pkt(family, a["C"], a["M"], kind, sport=40001, dport=8443))
    assert d is not None
    assert (d["family"], d["src"], d["dst"]) == (
        family,
        ipaddress.ip_address(a["C"]),
        ipaddress.ip_address(a["M"]),
    )
    assert (d["proto"], d["sport"], d["dport"], d["kind"]) == (
        6 if kind == "tcp" else 17,
        40001,
        8443,
        kind,
    )
    hdr = 20 if family == 4 else 40
    assert d["l4_offset"] == hdr
    assert d["checksum_offset"] == hdr + (16 if kind == "tcp" else 6)
    assert d["fragment"] is None and d["inner"] is None


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["echo", "echo_reply"])
def test_parse_echo_identifier_is_both_ports(family, kind):
    """The echo identifier stands in for both ports, so request and reply keys mirror."""
    a = ADDR[family]
    d = parse_packet(pkt(family, a["C"], a["M"], kind, sport=0xBEEF))
    assert d["kind"] == "echo" and d["sport"] == d["dport"] == 0xBEEF
    # ICMPv4 has no pseudo-header: nothing for the NAT to fix but the IP header.
    assert d["checksum_offset"] == (0 if family == 4 else 42)


def test_parse_other_icmp_and_protocols_have_no_ports():
    ts = parse_packet(raw(IP(src=C4, dst=M4) / ICMP(type=13)))  # timestamp request
    assert ts["kind"] == "icmp_other" and ts["icmp_type"] == 13 and ts["sport"] == 0
    gre = parse_packet(raw(IP(src=C4, dst=M4, proto=47) / Raw(b"\0" * 8)))
    assert gre["kind"] == "other" and gre["proto"] == 47 and gre["checksum_offset"] == 0
    ns = parse_packet(raw(IPv6(src=C6, dst=M6, nh=58) / Raw(bytes([135, 0, 0, 0]) + b"\0" * 20)))
    assert ns["kind"] == "icmp_other" and ns["icmp_type"] == 135
    # ICMPv4 inside IPv6 is just an unknown protocol there.
    odd = parse_packet(raw(IPv6(src=C6, dst=M6, nh=1) / Raw(b"\x08" + b"\0" * 7)))
    assert odd["kind"] == "other"


def test_parse_ipv4_options_and_trailing_padding():
    with_opts = raw(IP(src=C4, dst=M4, options=[b"\x01\x01\x01\x00"]) / UDP(sport=1, dport=2))
    assert parse_packet(with_opts)["l4_offset"] == 24
    padded = pkt(4, C4, M4, "udp") + b"\0" * 6  # link padding after total length
    d = parse_packet(padded)
    assert d["length"] == len(padded) - 6 and d["kind"] == "udp"


def test_parse_ipv6_extension_headers_are_walked():
    """Hop-by-hop, destination options and a finished routing header are skipped to reach TCP."""
    p = raw(
        IPv6(src=C6, dst=M6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting(addresses=[], segleft=0)
        / TCP(sport=5, dport=6)
    )
    d = parse_packet(p)
    assert (d["kind"], d["proto"], d["sport"], d["dport"]) == ("tcp", 6, 5, 6)
    assert d["l4_offset"] == 40 + 8 + 8 + 8


def test_parse_ipv6_extension_header_policy():
    # Segments left: the checksum's destination is not ip6.dst, so we cannot translate.
    routed = raw(IPv6(src=C6, dst=M6) / IPv6ExtHdrRouting(addresses=[R6], segleft=1) / UDP())
    assert parse_status(routed) == "unsupported"
    # Hop-by-hop is only allowed first (RFC 8200 4.1).
    late_hbh = raw(IPv6(src=C6, dst=M6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP())
    assert parse_status(late_hbh) == "malformed"
    # A chain longer than we are willing to walk.
    chain = IPv6(src=C6, dst=M6)
    for _ in range(9):
        chain = chain / IPv6ExtHdrDestOpt()
    assert parse_status(raw(chain / UDP())) == "unsupported"
    # AH ends the walk: an upper layer we do not look into.
    ah = parse_packet(raw(IPv6(src=C6, dst=M6, nh=51) / Raw(bytes([6, 4]) + b"\0" * 22) / TCP()))
    assert ah["kind"] == "other" and ah["proto"] == 51
    # An extension header running past the payload.
    short = raw(IPv6(src=C6, dst=M6, nh=60, plen=8) / Raw(bytes([17, 4]) + b"\0" * 6))
    assert parse_status(short) == "truncated"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", "truncated"),
        (b"\x45" + b"\0" * 10, "truncated"),
        (b"\x55" + b"\0" * 30, "malformed"),  # version 5
        (bytes.fromhex("44000014") + b"\0" * 16, "malformed"),  # IHL 4
        (bytes.fromhex("45000010") + b"\0" * 16, "malformed"),  # total length < IHL
        (bytes.fromhex("450000ff") + b"\0" * 16, "truncated"),  # total length > bytes
        (b"\x60" + b"\0" * 20, "truncated"),
    ],
)
def test_parse_rejects_bad_ip_headers(data, status):
    assert parse_status(data) == status
    assert parse_packet(data) is None


def test_parse_rejects_bad_l4_headers():
    bad_doff = bytearray(pkt(4, C4, M4, "tcp"))
    bad_doff[20 + 12] = 0x40  # data offset 4 words
    assert parse_status(bytes(bad_doff)) == "malformed"
    big_doff = bytearray(raw(IP(src=C4, dst=M4) / TCP()))
    big_doff[20 + 12] = 0xF0  # 60 bytes of header in a 20-byte segment
    assert parse_status(bytes(big_doff)) == "truncated"
    bad_ulen = bytearray(pkt(6, C6, M6, "udp"))
    bad_ulen[40 + 4 : 40 + 6] = (500).to_bytes(2, "big")
    assert parse_status(bytes(bad_ulen)) == "malformed"
    short_icmp = raw(IP(src=C4, dst=M4, proto=1) / Raw(b"\x08\0\0\0"))
    assert parse_status(short_icmp) == "truncated"


def test_parse_ipv4_fragments():
    """First fragment: ports and fragment id; later ones: no L4 header, same id."""
    frags = [
        raw(f)
        for f in fragment(
            IP(src=C4, dst=M4, id=0x1234) / UDP(sport=5353, dport=53) / Raw(b"x" * 3000), 1000
        )
    ]
    first = parse_packet(frags[0])
    assert first["kind"] == "udp" and first["sport"] == 5353
    assert first["fragment"] == {"id": 0x1234, "first": True}
    for later in frags[1:]:
        d = parse_packet(later)
        assert d["kind"] == "fragment" and d["proto"] == 17
        assert (d["sport"], d["dport"], d["checksum_offset"]) == (0, 0, 0)
        assert d["fragment"] == {"id": 0x1234, "first": False}
    # DF alone does not make a fragment.
    assert parse_packet(raw(IP(src=C4, dst=M4, flags="DF") / UDP()))["fragment"] is None


def test_parse_ipv4_tiny_first_fragment_is_malformed():
    """RFC 1858: a first fragment too short for the TCP header is an attack, not data."""
    tiny = raw(IP(src=C4, dst=M4, flags="MF", proto=6) / Raw(b"\0" * 8))
    assert parse_status(tiny) == "malformed"


def test_parse_ipv6_fragments():
    frags = [
        raw(f)
        for f in fragment6(
            IPv6(src=C6, dst=M6)
            / IPv6ExtHdrFragment(id=0xABCDEF01)
            / UDP(sport=1, dport=2)
            / Raw(b"y" * 3000),
            1280,
        )
    ]
    assert len(frags) == 3
    first = parse_packet(frags[0])
    assert first["kind"] == "udp" and first["l4_offset"] == 48
    assert first["fragment"] == {"id": 0xABCDEF01, "first": True}
    for later in frags[1:]:
        d = parse_packet(later)
        assert d["kind"] == "fragment" and d["fragment"] == {"id": 0xABCDEF01, "first": False}
    # An atomic fragment (offset 0, no more fragments) is a whole packet.
    atomic = parse_packet(raw(IPv6(src=C6, dst=M6) / IPv6ExtHdrFragment(id=9) / UDP()))
    assert atomic["fragment"] is None and atomic["kind"] == "udp"
    twice = raw(
        IPv6(src=C6, dst=M6) / IPv6ExtHdrFragment(id=9, m=1) / IPv6ExtHdrFragment(id=9) / UDP()
    )
    assert parse_status(twice) == "malformed"


@pytest.mark.parametrize("family", [4, 6])
def test_parse_icmp_error_locates_quoted_packet(family):
    a = ADDR[family]
    inner = pkt(family, a["C"], a["R"], "tcp", sport=40000, dport=443, payload=b"z" * 100)
    hdr = 20 if family == 4 else 40
    for quote_len, csum in ((hdr + 8, 0), (len(inner), 2 * hdr + 8 + 16)):
        d = parse_packet(icmp_error(family, a["X"], a["C"], "frag_needed", inner[:quote_len]))
        assert d["kind"] == "icmp_error" and (d["sport"], d["dport"]) == (0, 0)
        q = d["inner"]
        assert q is not None and q["kind"] == "tcp"
        assert (q["src"], q["dst"], q["sport"], q["dport"]) == (
            ipaddress.ip_address(a["C"]),
            ipaddress.ip_address(a["R"]),
            40000,
            443,
        )
        assert q["offset"] == hdr + 8 and q["l4_offset"] == 2 * hdr + 8
        # The error travels like the server's replies: its flow key is the quote reversed.
        assert q["flow_key"] == {
            "family": family,
            "proto": 6,
            "src": ipaddress.ip_address(a["R"]),
            "dst": ipaddress.ip_address(a["C"]),
            "sport": 443,
            "dport": 40000,
        }
        # TCP's checksum is past the 8 bytes RFC 792 promises: fixable only in a longer quote.
        assert q["checksum_offset"] == csum


@pytest.mark.parametrize("family", [4, 6])
def test_parse_icmp_error_with_unusable_quote(family):
    a = ADDR[family]
    inner = pkt(family, a["C"], a["R"], "udp")
    hdr = 20 if family == 4 else 40
    for quote in (
        inner[: hdr + 4],
        inner[: hdr - 1],
        pkt(10 - family, ADDR[10 - family]["C"], ADDR[10 - family]["R"], "udp"),
    ):
        d = parse_packet(icmp_error(family, a["X"], a["C"], "port_unreach", quote))
        assert d["kind"] == "icmp_error" and d["inner"] is None


def test_parse_icmp_error_quoting_a_later_fragment_and_an_echo():
    later = raw(fragment(IP(src=C4, dst=R4, id=77) / UDP() / Raw(b"x" * 2000), 1000)[1])
    d = parse_packet(icmp_error(4, X4, C4, "time_exceeded", later[:28]))
    assert d["inner"]["kind"] == "fragment" and d["inner"]["sport"] == 0
    echo = pkt(6, C6, R6, "echo", sport=321)
    d6 = parse_packet(icmp_error(6, X6, C6, "time_exceeded", echo))
    assert d6["inner"]["kind"] == "echo" and d6["inner"]["sport"] == 321
    assert d6["inner"]["checksum_offset"] == 48 + 40 + 2


# ---- parser robustness: never read past n (guard page), never OK when truncated ----


def valid_packets() -> list[bytes]:
    out = []
    for fam in (4, 6):
        a = ADDR[fam]
        for kind in ("tcp", "udp", "echo"):
            out.append(pkt(fam, a["C"], a["M"], kind, payload=b"p" * 30))
        inner = pkt(fam, a["C"], a["R"], "udp", payload=b"q" * 40)
        out.append(icmp_error(fam, a["X"], a["C"], "port_unreach", inner))
    out.append(
        raw(
            IPv6(src=C6, dst=M6)
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrDestOpt()
            / IPv6ExtHdrFragment(id=3, m=1)
            / TCP()
            / Raw(b"r" * 16)
        )
    )
    out.append(
        raw(IP(src=C4, dst=M4, options=[b"\x01\x01\x01\x00"]) / TCP(options=[("MSS", 1400)]))
    )
    return out


VALID = valid_packets()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_parser(data):
    status, d = guarded_parse(data)
    assert status in ("ok", "truncated", "malformed", "unsupported")
    if d is not None:
        assert d["l4_offset"] <= d["length"] <= len(data)


@settings(max_examples=300)
@given(st.sampled_from(VALID), st.data())
def test_truncated_valid_packets_are_never_ok(packet, data):
    cut = data.draw(st.integers(0, len(packet) - 1))
    status, d = guarded_parse(packet[:cut])
    assert status != "ok" and d is None


@settings(max_examples=400)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
    st.integers(0, 2000),
)
def test_mutated_valid_packets_never_crash_the_parser(packet, flips, cut):
    """Corrupt header bytes and lengths: the parser reports, it never reads beyond the end."""
    b = bytearray(packet)
    for at, value in flips:
        b[at % len(b)] = value
    data = bytes(b[: max(1, cut % (len(b) + 1))])
    status, d = guarded_parse(data)
    if d is not None:
        assert d["length"] <= len(data)
        if d["inner"] is not None:
            assert d["inner"]["offset"] < d["length"]
            assert d["inner"]["checksum_offset"] + 2 <= d["length"]
    # The NAT and ICMP builders only follow the parser's offsets; exercise them too.
    if status == "ok":
        nat_rewrite(data, "dst", b"\x01" * (4 if d["family"] == 4 else 16))
        icmp_unreachable(data)


# ---- NAT: rewrite with incremental checksums vs scapy's full recomputation ----


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp", "echo", "echo_reply"])
def test_client_dnat_magic_to_transit_and_back(family, kind):
    """Destination magic -> transit on the way out; source transit -> magic on return."""
    a = ADDR[family]
    out = pkt(family, a["C"], a["M"], kind)
    assert nat_rewrite(out, "dst", packed(a["T"])) == pkt(family, a["C"], a["T"], kind)
    back = pkt(family, a["T"], a["C"], kind, sport=443, dport=40000)
    assert nat_rewrite(back, "src", packed(a["M"])) == pkt(
        family, a["M"], a["C"], kind, sport=443, dport=40000
    )


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp", "echo"])
def test_connector_dnat_transit_to_real_and_snat_back(family, kind):
    """Destination transit -> real; the return's source real -> transit."""
    a = ADDR[family]
    assert nat_rewrite(
        pkt(family, a["C"], a["T"], kind), "dst", ipaddress.ip_address(a["R"])
    ) == pkt(family, a["C"], a["R"], kind)
    assert nat_rewrite(pkt(family, a["R"], a["C"], kind), "src", packed(a["T"])) == pkt(
        family, a["T"], a["C"], kind
    )


def test_udp_checksum_zero_stays_zero_on_ipv4():
    zero = pkt(4, C4, M4, "udp", chksum=0)
    out = nat_rewrite(zero, "dst", packed(T4))
    assert out == pkt(4, C4, T4, "udp", chksum=0)
    assert out[26:28] == b"\0\0"


def test_udp_checksum_zero_is_left_alone_on_ipv6():
    zero = pkt(6, C6, M6, "udp", chksum=0)
    out = nat_rewrite(zero, "dst", packed(T6))
    assert out[46:48] == b"\0\0" and out[24:40] == packed(T6)


@pytest.mark.parametrize("family", [4, 6])
def test_udp_checksum_that_computes_to_zero_is_sent_as_ffff(family):
    """RFC 768: a computed 0 is transmitted as all ones, as scapy does."""
    a = ADDR[family]
    probe = pkt(family, a["C"], a["T"], "udp", payload=b"\0\0")
    hdr = 20 if family == 4 else 40
    # A payload word equal to the checksum makes the translated packet sum to 0xFFFF.
    payload = probe[hdr + 6 : hdr + 8]
    want = pkt(family, a["C"], a["T"], "udp", payload=payload)
    assert want[hdr + 6 : hdr + 8] == b"\xff\xff"
    assert (
        nat_rewrite(pkt(family, a["C"], a["M"], "udp", payload=payload), "dst", packed(a["T"]))
        == want
    )


def test_nat_rewrite_rejects_bad_arguments():
    good = pkt(4, C4, M4, "tcp")
    with pytest.raises(ValueError, match="4-byte"):
        nat_rewrite(good, "dst", packed(T6))
    with pytest.raises(ValueError, match="'src' or 'dst'"):
        nat_rewrite(good, "both", packed(T4))
    with pytest.raises(ValueError, match="truncated"):
        nat_rewrite(good[:30], "dst", packed(T4))


ADDR4 = st.integers(1, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
ADDR6 = st.integers(1, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))


# Host addresses an unreachable may be sent for: v4 1/8-126/8, 128/8-223/8; v6 2000::/3.
HOST4 = (
    st.integers(0x01000000, 0xDFFFFFFF)
    .filter(lambda i: i >> 24 != 127)
    .map(lambda i: str(ipaddress.IPv4Address(i)))
)
HOST6 = st.integers(0x2 << 124, (0x4 << 124) - 1).map(lambda i: str(ipaddress.IPv6Address(i)))


@st.composite
def packets(draw, hosts: bool = False):
    family = draw(st.sampled_from([4, 6]))
    addr = {4: (ADDR4, HOST4), 6: (ADDR6, HOST6)}[family][hosts]
    src, dst, new = draw(addr), draw(addr), draw(addr)
    kind = draw(st.sampled_from(["tcp", "udp", "echo", "echo_reply"]))
    kw = {
        "sport": draw(st.integers(0, 65535)),
        "dport": draw(st.integers(0, 65535)),
        "payload": draw(st.binary(max_size=64)),
    }
    if kind == "udp" and family == 4 and draw(st.booleans()):
        kw["chksum"] = 0
    return family, src, dst, new, kind, kw


@settings(max_examples=300)
@given(packets(), st.sampled_from(["src", "dst"]))
def test_rewrite_matches_full_recomputation(case, which):
    family, src, dst, new, kind, kw = case
    before = pkt(family, src, dst, kind, **kw)
    want = pkt(family, new if which == "src" else src, new if which == "dst" else dst, kind, **kw)
    assert nat_rewrite(before, which, packed(new)) == want


@settings(max_examples=300)
@given(packets(), st.sampled_from(["src", "dst"]))
def test_rewrite_then_reverse_restores_the_original(case, which):
    """DNAT A->B then the reverse rewrite B->A gives back the exact original bytes."""
    family, src, dst, new, kind, kw = case
    before = pkt(family, src, dst, kind, **kw)
    old = src if which == "src" else dst
    there = nat_rewrite(before, which, packed(new))
    assert nat_rewrite(there, which, packed(old)) == before


# ---- NAT of fragments ----


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_fragments_of_a_translated_flow(family, kind):
    """The first fragment's L4 checksum is fixed for the whole datagram; later
    fragments get the first one's rewrite through the fragment tracker."""
    a = ADDR[family]

    def frags(dst: str) -> list[bytes]:
        body = l4(family, kind, payload=b"f" * 2500)
        if family == 4:
            return [raw(f) for f in fragment(IP(src=a["C"], dst=dst, id=0x4242) / body, 1000)]
        return [
            raw(f)
            for f in fragment6(
                IPv6(src=a["C"], dst=dst) / IPv6ExtHdrFragment(id=0x4242) / body, 1280
            )
        ]

    before, want = frags(a["M"]), frags(a["T"])
    assert len(before) > 1
    tracker = FragTracker(timeout_ms=30_000)
    assert nat_rewrite(before[0], "dst", packed(a["T"])) == want[0]
    assert tracker.remember(before[0], "dst", packed(a["T"]), now=100_000)
    for got, expected in zip(before[1:], want[1:], strict=True):
        assert tracker.lookup(got, now=101_000) == ("dst", packed(a["T"]))
        assert tracker.translate(got, now=101_000) == expected
        assert nat_rewrite(got, "dst", packed(a["T"])) == expected  # IP header only


def test_fragment_tracker_keys_and_expiry():
    frags = [raw(f) for f in fragment(IP(src=C4, dst=M4, id=7) / UDP() / Raw(b"x" * 2000), 1000)]
    other_id = [raw(f) for f in fragment(IP(src=C4, dst=M4, id=8) / UDP() / Raw(b"x" * 2000), 1000)]
    t = FragTracker(timeout_ms=30_000)
    assert not t.remember(frags[1], "dst", packed(T4), now=0)  # not a first fragment
    assert not t.remember(pkt(4, C4, M4, "udp"), "dst", packed(T4), now=0)
    assert t.remember(frags[0], "dst", packed(T4), now=10_000)
    assert t.lookup(frags[1], now=40_000) == ("dst", packed(T4))
    assert t.lookup(other_id[1], now=10_000) is None
    assert t.lookup(frags[0], now=10_000) is None  # first fragments go through the flow table
    assert t.lookup(frags[1], now=40_001) is None  # older than the timeout
    assert t.translate(frags[1], now=41_000) is None
    # Remembering again refreshes the entry.
    t.remember(frags[0], "src", packed(X4), now=50_000)
    assert t.lookup(frags[1], now=60_000) == ("src", packed(X4))


def test_fragment_tracker_survives_more_datagrams_than_slots():
    """The table is fixed-size: old entries are displaced, recent ones still found."""
    first, later = (raw(f) for f in fragment(IP(src=C4, dst=M4) / UDP() / Raw(b"x" * 1200), 1000))

    def with_id(frag: bytes, i: int) -> bytes:
        hdr = frag[:4] + i.to_bytes(2, "big") + frag[6:10] + b"\0\0" + frag[12:20]
        return hdr[:10] + internet_checksum(hdr).to_bytes(2, "big") + hdr[12:] + frag[20:]

    t = FragTracker(timeout_ms=30_000)
    firsts = {i: with_id(first, i) for i in range(3000)}
    laters = {i: with_id(later, i) for i in range(3000)}
    assert parse_packet(laters[77])["fragment"] == {"id": 77, "first": False}
    for i in range(3000):
        assert t.remember(firsts[i], "dst", packed(T4), now=i)
    assert t.lookup(laters[2999], now=3000) == ("dst", packed(T4))
    found = sum(t.lookup(laters[i], now=3000) is not None for i in range(3000))
    assert 1024 * 0.5 < found <= 1024


# ---- ICMP errors about a translated flow ----


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("quote_all", [False, True])
def test_connector_frag_needed_from_a_router_reaches_the_client(family, quote_all):
    """A router's frag-needed / packet-too-big about C->R is translated with the return
    action (source R -> T): the quoted destination becomes T; the router stays the source."""
    a = ADDR[family]
    hdr = 20 if family == 4 else 40

    def err(real: str) -> bytes:
        inner = pkt(family, a["C"], real, "tcp", payload=b"d" * 1500)
        return icmp_error(
            family,
            a["X"],
            a["C"],
            "frag_needed",
            inner[: (548 if family == 4 else 1232) if quote_all else hdr + 8],
        )

    assert nat_translate(err(a["R"]), "src", packed(a["T"])) == err(a["T"])


@pytest.mark.parametrize(("family", "udp_chksum"), [(4, None), (4, 0), (6, None)])
def test_connector_port_unreachable_from_the_server(family, udp_chksum):
    """Sent by R itself: outer source and quoted destination both become T, with the
    quoted IPv4 header and UDP checksums fixed (a zero UDP checksum stays zero on v4)."""
    a = ADDR[family]
    kw = {} if udp_chksum is None else {"chksum": 0}

    def err(real: str) -> bytes:
        return icmp_error(
            family,
            real,
            a["C"],
            "port_unreach",
            pkt(family, a["C"], real, "udp", payload=b"dns?" * 10, **kw),
        )

    assert nat_translate(err(a["R"]), "src", packed(a["T"])) == err(a["T"])


@pytest.mark.parametrize("family", [4, 6])
def test_client_translates_errors_in_both_directions(family):
    """Return path (source T -> M): an error from T quoting C->T becomes from M quoting C->M.
    Out path (destination M -> T): the app host's port unreachable about M->C, sent to M,
    becomes one to T quoting T->C."""
    a = ADDR[family]

    def back(t: str) -> bytes:
        return icmp_error(family, t, a["C"], "port_unreach", pkt(family, a["C"], t, "udp"))

    assert nat_translate(back(a["T"]), "src", packed(a["M"])) == back(a["M"])

    def out(t: str) -> bytes:
        return icmp_error(
            family, a["C"], t, "port_unreach", pkt(family, t, a["C"], "udp", sport=53, dport=40000)
        )

    assert nat_translate(out(a["M"]), "dst", packed(a["T"])) == out(a["T"])


@pytest.mark.parametrize("family", [4, 6])
def test_time_exceeded_about_an_echo(family):
    """A traceroute-style error quoting a ping: the quoted ICMPv6 checksum is fixed too."""
    a = ADDR[family]

    def err(real: str) -> bytes:
        return icmp_error(
            family, a["X"], a["C"], "time_exceeded", pkt(family, a["C"], real, "echo", sport=99)
        )

    assert nat_translate(err(a["R"]), "src", packed(a["T"])) == err(a["T"])


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_outer_rewrite_leaves_the_quote(family):
    """nat_rewrite touches the outer header only (ICMPv6: its pseudo-header checksum)."""
    a = ADDR[family]
    quote = pkt(family, a["C"], a["R"], "udp")
    got = nat_rewrite(
        icmp_error(family, a["X"], a["C"], "port_unreach", quote), "dst", packed(a["M"])
    )
    assert got == icmp_error(family, a["X"], a["M"], "port_unreach", quote)


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_inner_rewrite_helper(family):
    a = ADDR[family]

    def err(src: str) -> bytes:
        return icmp_error(family, a["X"], a["C"], "port_unreach", pkt(family, src, a["R"], "udp"))

    assert nat_rewrite_icmp_inner(err(a["C"]), "src", packed(a["C"]), packed(a["M"])) == err(a["M"])
    with pytest.raises(ValueError, match="not"):
        nat_rewrite_icmp_inner(err(a["C"]), "src", packed(a["T"]), packed(a["M"]))
    with pytest.raises(ValueError, match="ICMP error"):
        nat_rewrite_icmp_inner(
            pkt(family, a["C"], a["R"], "udp"), "src", packed(a["C"]), packed(a["M"])
        )


def test_icmp_error_with_unusable_quote_is_not_translated():
    unusable = icmp_error(4, X4, C4, "port_unreach", pkt(4, C4, R4, "udp")[:24])
    assert nat_translate(unusable, "src", packed(T4)) is None


def test_frag_tracker_rejects_negative_times():
    with pytest.raises(ValueError, match="now must be >= 0"):
        FragTracker().lookup(pkt(4, C4, M4, "udp"), now=-1)


@st.composite
def icmp_errors(draw):
    family = draw(st.sampled_from([4, 6]))
    a = ADDR[family]
    kind = draw(st.sampled_from(["tcp", "udp", "echo"]))
    inner = pkt(
        family,
        a["C"],
        a["R"],
        kind,
        payload=draw(st.binary(max_size=200)),
        sport=draw(st.integers(0, 65535)),
    )
    hdr = 20 if family == 4 else 40
    quote = inner[: draw(st.integers(hdr + 8, len(inner)))]
    err_kind = draw(st.sampled_from(["frag_needed", "port_unreach", "time_exceeded"]))
    src = draw(st.sampled_from([a["X"], a["R"]]))
    return family, icmp_error(family, src, a["C"], err_kind, quote)


@settings(max_examples=200)
@given(icmp_errors())
def test_icmp_error_translation_round_trips(case):
    family, err = case
    a = ADDR[family]
    there = nat_translate(err, "src", packed(a["T"]))
    assert there is not None and there != err
    assert nat_translate(there, "src", packed(a["R"])) == err


# ---- ICMP unreachable generation ----


def test_host_unreachable_v4():
    """From the magic IP to the sender, type 3 code 1, TTL 64, the packet quoted."""
    syn = pkt(4, C4, M4, "tcp")
    reply = icmp_unreachable(syn)
    want = raw(IP(src=M4, dst=C4, ttl=64, id=0, flags=0) / ICMP(type=3, code=1) / Raw(syn))
    assert reply == want
    d = parse_packet(reply)
    assert d["kind"] == "icmp_error" and d["inner"]["dport"] == 443


def test_address_unreachable_v6():
    syn = pkt(6, C6, M6, "tcp")
    assert icmp_unreachable(syn) == raw(
        IPv6(src=M6, dst=C6, hlim=64) / ICMPv6DestUnreach(code=3) / Raw(syn)
    )


@pytest.mark.parametrize(("family", "limit"), [(4, 576), (6, 1280)])
def test_unreachable_quote_is_bounded(family, limit):
    a = ADDR[family]
    big = pkt(family, a["C"], a["M"], "udp", payload=b"B" * 1400)
    reply = icmp_unreachable(big)
    hdr = 28 if family == 4 else 48
    assert len(reply) == limit and reply[hdr:] == big[: limit - hdr]
    head = ip(
        family,
        a["M"],
        a["C"],
        **({"ttl": 64, "flags": 0, "id": 0} if family == 4 else {"hlim": 64}),
    )
    body = ICMP(type=3, code=1) if family == 4 else ICMPv6DestUnreach(code=3)
    assert reply == raw(head / body / Raw(big[: limit - hdr]))


@pytest.mark.parametrize("family", [4, 6])
def test_unreachable_answers_an_echo_request(family):
    a = ADDR[family]
    assert icmp_unreachable(pkt(family, a["C"], a["M"], "echo")) != b""


@pytest.mark.parametrize(
    "packet",
    [
        icmp_error(4, C4, M4, "port_unreach", pkt(4, M4, C4, "udp")),
        icmp_error(6, C6, M6, "frag_needed", pkt(6, M6, C6, "udp")),
        raw(IP(src=C4, dst=M4) / ICMP(type=5, code=1, gw=R4) / Raw(pkt(4, M4, C4, "udp")[:28])),
        raw(
            IPv6(src=C6, dst=M6, nh=58) / Raw(bytes([100, 0, 0, 0]) + b"\0" * 4)
        ),  # unknown v6 error
        raw(fragment(IP(src=C4, dst=M4) / UDP() / Raw(b"x" * 2000), 1000)[1]),
        pkt(4, "0.0.0.0", M4, "udp"),
        pkt(4, "224.0.0.5", M4, "udp"),
        pkt(4, C4, "255.255.255.255", "udp"),
        pkt(6, "::", M6, "udp"),
        pkt(6, "ff02::1", M6, "udp"),
    ],
    ids=[
        "v4-error",
        "v6-error",
        "v4-redirect",
        "v6-unknown-error",
        "later-fragment",
        "v4-zero-src",
        "v4-multicast-src",
        "v4-broadcast-dst",
        "v6-unspecified-src",
        "v6-multicast-src",
    ],
)
def test_no_unreachable_in_reply_to_errors_and_non_hosts(packet):
    """Never an ICMP error about an ICMP error (RFC 1122 3.2.2, RFC 4443 2.4(e))."""
    assert icmp_unreachable(packet) == b""


def test_unreachable_rejects_malformed_packets():
    with pytest.raises(ValueError, match="malformed"):
        icmp_unreachable(b"\x55" + b"\0" * 30)


@settings(max_examples=200)
@given(packets(hosts=True))
def test_unreachable_checksums_match_full_recomputation(case):
    family, src, dst, _new, kind, kw = case
    offending = pkt(family, src, dst, kind, **kw)
    reply = icmp_unreachable(offending)
    head = ip(
        family, dst, src, **({"ttl": 64, "flags": 0, "id": 0} if family == 4 else {"hlim": 64})
    )
    body = ICMP(type=3, code=1) if family == 4 else ICMPv6DestUnreach(code=3)
    assert reply == raw(head / body / Raw(offending))
