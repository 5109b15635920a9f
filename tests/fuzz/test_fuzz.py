"""Bounded fuzzing of what reads untrusted bytes: the datapath, the DNS mapper, the peer API.

Each target runs ``max_examples`` of the "conn25-fuzz" profile: small enough that all of them
together take under a minute in CI; CONN25_FUZZ_EXAMPLES raises it for a longer local run
(e.g. ``CONN25_FUZZ_EXAMPLES=20000 pytest tests/fuzz/test_fuzz.py``). Inputs that once failed
stay as ``@example`` cases.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct
from collections.abc import Callable

import msgspec
from dnslib import AAAA, CLASS, CNAME, HTTPS, QTYPE, RR, TXT, A, DNSHeader, DNSQuestion, DNSRecord
from dnslib.dns import RD, RDMAP
from dnslib.label import DNSBuffer, DNSLabel
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import dnswire
import wgsessions
from conn25.core import dnsname, peerapi
from conn25.core.assignments import Assignments
from conn25.core.config import App, Member, NodeConfig, Pools, Tailnet
from conn25.core.dnsmap import (
    MAX_CHAIN,
    DNSMapError,
    DNSMapper,
    answer_addresses,
    query_question,
    servfail,
)
from conn25.core.dnsquery import parse as parse_head
from conn25.core.iprange import IPRange, IPSet
from conn25.fastpath import Datapath
from nodekeys import public_key

settings.register_profile(
    "conn25-fuzz",
    max_examples=int(os.environ.get("CONN25_FUZZ_EXAMPLES", "1000")),
    deadline=None,  # timing varies on shared CI machines; the bound is max_examples
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("conn25-fuzz")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- independent checksums (RFC 1071) -------------------------------------------------------------


def csum(data: bytes) -> int:
    """The Internet checksum of ``data``: 0 over a message whose checksum field is right."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


# -- packets, built by hand (fast, and every field under control) ----------------------------------

TCP, UDP, ICMP, ICMP6, FRAG6 = 6, 17, 1, 58, 44


def l4(proto: int, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
       *, icmp_type: int = 8, icmp_code: int = 0, udp_zero: bool = False) -> bytes:
    """A TCP/UDP/ICMP/ICMPv6 message with a correct checksum (UDP/IPv4 may carry 0)."""
    if proto == TCP:
        head = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
        off = 16
    elif proto == UDP:
        head = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        off = 6
    else:  # echo id in place of the source port, as the flow table keys it
        head = struct.pack("!BBHHH", icmp_type, icmp_code, 0, sport, 1)
        off = 2
    seg = bytearray(head + payload)
    if proto == UDP and udp_zero and len(src) == 4:
        return bytes(seg)
    ph = b"" if proto == ICMP else pseudo(src, dst, proto, len(seg))
    c = csum(ph + bytes(seg))
    if proto == UDP and c == 0:
        c = 0xFFFF  # RFC 768: a computed 0 goes out as all ones
    struct.pack_into("!H", seg, off, c)
    return bytes(seg)


def icmp_error(version: int, src: bytes, dst: bytes, kind: int, quoted: bytes) -> bytes:
    """An ICMP(v6) error quoting ``quoted`` (types that the datapath translates and others)."""
    if version == 4:
        icmp_type, code = [(3, 4), (3, 3), (3, 1), (11, 0), (12, 0), (5, 1)][kind % 6]
        head = struct.pack("!BBHHH", icmp_type, code, 0, 0, 1400 if code == 4 else 0)
        msg = bytearray(head + quoted)
        struct.pack_into("!H", msg, 2, csum(bytes(msg)))
        return bytes(msg)
    icmp_type, code = [(2, 0), (1, 4), (1, 3), (3, 0), (4, 0), (128, 0)][kind % 6]
    head = struct.pack("!BBHI", icmp_type, code, 0, 1280 if icmp_type == 2 else 0)
    msg = bytearray(head + quoted)
    struct.pack_into("!H", msg, 2, csum(pseudo(src, dst, ICMP6, len(msg)) + bytes(msg)))
    return bytes(msg)


def ip_packet(src: bytes, dst: bytes, proto: int, payload: bytes,
              *, frag: int = 0, more: bool = False, ident: int = 7) -> bytes:
    """IPv4 or IPv6 (by address length) around ``payload``; a fragment when asked."""
    if len(src) == 4:
        flags = (0x2000 if more else 0) | (frag & 0x1FFF)
        head = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags,
                                     64, proto, 0, src, dst))
        struct.pack_into("!H", head, 10, csum(bytes(head)))
        return bytes(head) + payload
    if frag or more:
        payload = struct.pack("!BxHI", proto, (frag << 3) | more, ident) + payload
        proto = FRAG6
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, src, dst) + payload


# -- what a translated packet must still satisfy ---------------------------------------------------


def checks(pkt: bytes) -> dict[str, bool]:
    """Each checksum of ``pkt`` that can be verified, and whether it verifies.

    A fragment's transport checksum covers bytes we do not have, and a quoted
    packet's transport header is cut short: those are not checked. Also the
    "udp4 zero" fact, which a translation must keep either way.
    """
    out: dict[str, bool] = {}
    if len(pkt) < 1:
        return out
    if pkt[0] >> 4 == 4 and len(pkt) >= 20:
        ihl = (pkt[0] & 0xF) * 4
        if ihl < 20 or len(pkt) < ihl:
            return out
        out["ip"] = csum(pkt[:ihl]) == 0
        total = struct.unpack_from("!H", pkt, 2)[0]
        fragment = struct.unpack_from("!H", pkt, 6)[0] & 0x3FFF
        if total < ihl or total > len(pkt) or fragment:
            return out
        proto, src, dst, seg = pkt[9], pkt[12:16], pkt[16:20], pkt[ihl:total]
    elif pkt[0] >> 4 == 6 and len(pkt) >= 40:
        plen = struct.unpack_from("!H", pkt, 4)[0]
        if 40 + plen > len(pkt):
            return out
        proto, src, dst, seg = pkt[6], pkt[8:24], pkt[24:40], pkt[40 : 40 + plen]
    else:
        return out
    if proto == TCP and len(seg) >= 20:
        out["l4"] = csum(pseudo(src, dst, proto, len(seg)) + seg) == 0
    elif proto == UDP and len(seg) >= 8:
        zero = seg[6:8] == b"\0\0"
        if len(src) == 4:
            out["udp4 zero"] = zero
        if not (zero and len(src) == 4):
            out["l4"] = csum(pseudo(src, dst, proto, len(seg)) + seg) == 0
    elif proto == ICMP and len(seg) >= 8:
        out["l4"] = csum(seg) == 0
        if seg[0] in (3, 11, 12) and len(seg) >= 28 and seg[8] >> 4 == 4:
            inner_ihl = (seg[8] & 0xF) * 4
            if inner_ihl >= 20 and len(seg) >= 8 + inner_ihl:
                out["inner ip"] = csum(seg[8 : 8 + inner_ihl]) == 0
    elif proto == ICMP6 and len(seg) >= 4:
        out["l4"] = csum(pseudo(src, dst, proto, len(seg)) + seg) == 0
    return out


def assert_translation_keeps_checksums(before: bytes, after: bytes) -> None:
    """What verified before the translation verifies after it; UDP/IPv4 0 stays 0, else not 0."""
    if after == before:
        return
    was, now = checks(before), checks(after)
    for key, ok in was.items():
        if key == "udp4 zero":
            assert now.get(key) == ok, (key, before.hex(), after.hex())
        elif ok:
            assert now.get(key) is True, (key, before.hex(), after.hex())


# -- target a: the datapath's parser and NAT -------------------------------------------------------

VERDICTS = {"drop", "peer", "tun", "reply", "reject", "handshake"}
CONN_PEER, CLIENT_PEER = 2, 1
CONN_EP, CLIENT_EP = ("192.0.2.2", 41641), ("192.0.2.1", 41641)
NOW_MS = 5_000_000


def _addrs(*texts: str) -> dict[str, bytes]:
    names = ("self", "magic", "transit_a", "client", "transit_b", "real", "connector", "router",
             "unassigned magic", "unmapped transit")
    return {n: ip(t).packed for n, t in zip(names, texts, strict=True)}


ADDR = {
    4: _addrs("100.64.0.3", "100.80.0.5", "169.254.128.5", "100.64.0.1", "169.254.128.9",
              "203.0.113.10", "100.64.0.2", "198.51.100.1", "100.80.0.99", "169.254.128.99"),
    6: _addrs("fd7a:115c:a1e0::3", "fd7a:115c:a1e0:ab12::5", "fd7a:115c:a1e0:ab13::5",
              "fd7a:115c:a1e0::1", "fd7a:115c:a1e0:ab13::9", "2001:db8::10",
              "fd7a:115c:a1e0::2", "2001:db8:ffff::1", "fd7a:115c:a1e0:ab12::99",
              "fd7a:115c:a1e0:ab13::99"),
}
# The four legs of the two translated flows: (where it comes in, source, destination).
# Client: self -> magic out of the TUN (to transit_a at the connector), transit_a -> self back.
# Connector: client -> transit_b from the client peer (to real out of the TUN), real -> client back.
LEGS: list[tuple[str | tuple[str, int], str, str]] = [
    ("tun", "self", "magic"),
    (CONN_EP, "transit_a", "self"),
    (CLIENT_EP, "client", "transit_b"),
    ("tun", "real", "client"),
]


# A session with each peer, told apart by index and keys; the fuzzer plays the peers.
# A datagram "from" an underlay address that is neither comes under no session of ours.
_SESSIONS = {
    CONN_PEER: wgsessions.pair(local_index=CONN_PEER, remote_index=100 + CONN_PEER,
                               key_out=bytes([CONN_PEER]) * 32),
    CLIENT_PEER: wgsessions.pair(local_index=CLIENT_PEER, remote_index=100 + CLIENT_PEER,
                                 key_out=bytes([CLIENT_PEER]) * 32),
}
_STRANGER = wgsessions.Remote(wgsessions.pair(local_index=0xDEAD, remote_index=0xBEEF)[1])
REMOTES = {CONN_EP: wgsessions.Remote(_SESSIONS[CONN_PEER][1]),
           CLIENT_EP: wgsessions.Remote(_SESSIONS[CLIENT_PEER][1])}


def sealed(pkt: bytes, ingress: tuple[str, int]) -> bytes:
    """`pkt` as the peer at `ingress` sends it, under its session with the datapath."""
    return REMOTES.get(ingress, _STRANGER).seal(pkt)


def make_datapath() -> Datapath:
    dp = Datapath(client=True, connector=True, client_flows=256, connector_flows=256)
    t = dp.tables
    t.set_peer(CONN_PEER, ip(CONN_EP[0]).packed, CONN_EP[1],
               [ADDR[4]["connector"], ADDR[6]["connector"]])
    t.set_peer(CLIENT_PEER, ip(CLIENT_EP[0]).packed, CLIENT_EP[1],
               [ADDR[4]["client"], ADDR[6]["client"]])
    t.set_magic_ranges([IPRange.parse("100.80.0.0/16"),
                        IPRange.parse("fd7a:115c:a1e0:ab12::/64")])
    t.set_transit_ranges([IPRange.parse("169.254.128.0/17"),
                          IPRange.parse("fd7a:115c:a1e0:ab13::/64")])
    for v in (4, 6):
        a = ADDR[v]
        t.set_magic(a["magic"], a["transit_a"])
        t.set_route(a["transit_a"], CONN_PEER)
        t.set_transit(CLIENT_PEER, a["transit_b"], a["real"], 3)
    set_local = getattr(t, "set_local", None)  # the node's own addresses, where supported
    if set_local is not None:
        set_local([ADDR[4]["self"], ADDR[6]["self"]])
    for peer, (ours, _) in _SESSIONS.items():
        wgsessions.install(dp, peer, ours, NOW_MS)
    return dp


def run_packet(dp: Datapath, ingress: str | tuple[str, int], pkt: bytes) -> tuple[str, bytes]:
    """Feed ``pkt`` where it comes in; check the verdict and any translation it made."""
    if ingress == "tun":
        verdict, out, peer = dp.process_from_tun(pkt, NOW_MS)
        translated = verdict == "peer"
        if translated:
            assert peer in (CONN_PEER, CLIENT_PEER)
    else:
        verdict, out, peer = dp.process_datagram(sealed(pkt, ingress), ingress, NOW_MS)
        translated = verdict == "tun"
    assert verdict in VERDICTS
    assert isinstance(out, bytes)
    if translated:
        assert_translation_keeps_checksums(pkt, out)
    elif verdict == "reply":  # an ICMP error we made: its own checksums are right
        made = checks(out)
        assert made.get("ip", True) and made["l4"], (pkt.hex(), out.hex())
    return verdict, out


PORTS = st.sampled_from([40000, 443, 53, 0, 65535])
Ingress = str | tuple[str, int]
# Each translated flow: its first packet (ingress, source, destination), that packet as it
# leaves translated, and the return as it comes in.
FLOWS: dict[str, tuple[tuple[Ingress, str, str], tuple[str, str], tuple[Ingress, str, str]]] = {
    "client": (LEGS[0], ("self", "transit_a"), LEGS[1]),
    "connector": (LEGS[2], ("client", "real"), LEGS[3]),
}


def segment(v: int, proto: int | str, s: bytes, d: bytes, sport: int, dport: int,
            payload: bytes, *, reply: bool = False, udp_zero: bool = False) -> tuple[int, bytes]:
    """(IP protocol, transport message) of a flow's packet; echo id ``sport`` both ways."""
    if proto == "icmp":
        icmp = ICMP if v == 4 else ICMP6
        echo = (0 if v == 4 else 129) if reply else (8 if v == 4 else 128)
        return icmp, l4(icmp, s, d, sport, 0, payload, icmp_type=echo)
    assert isinstance(proto, int)
    return proto, l4(proto, s, d, sport, dport, payload, udp_zero=udp_zero)


@st.composite
def flow_packets(draw: st.DrawFn) -> list[tuple[Ingress, bytes, bool]]:
    """A packet of a translated flow (any kind), after the flow's clean first packet or not.

    Items are (ingress, packet, whether the packet may be mutated).
    """
    v = draw(st.sampled_from([4, 6]))
    a = ADDR[v]
    (ingress, fsrc, fdst), (osrc, odst), (bingress, bsrc, bdst) = FLOWS[draw(st.sampled_from(
        sorted(FLOWS)))]
    proto = draw(st.sampled_from([TCP, UDP, "icmp"]))
    sport, dport = draw(PORTS), draw(PORTS)
    payload = draw(st.binary(max_size=40))
    udp_zero = draw(st.booleans())
    out: list[tuple[Ingress, bytes, bool]] = []
    if draw(st.integers(0, 4)):
        p, seg = segment(v, proto, a[fsrc], a[fdst], sport, dport, b"open", udp_zero=udp_zero)
        out.append((ingress, ip_packet(a[fsrc], a[fdst], p, seg), False))
    kind = draw(st.sampled_from(["forward", "return", "error far", "error near", "fragment",
                                 "other leg"]))
    if kind == "forward" or kind == "other leg":
        if kind == "other leg":  # any addresses of the set-up, any way in
            ingress = draw(st.sampled_from(["tun", CONN_EP, CLIENT_EP]))
            fsrc, fdst = draw(st.sampled_from(sorted(a))), draw(st.sampled_from(sorted(a)))
        p, seg = segment(v, proto, a[fsrc], a[fdst], sport, dport, payload, udp_zero=udp_zero)
        out.append((ingress, ip_packet(a[fsrc], a[fdst], p, seg), True))
    elif kind == "return":
        back = (sport, dport) if proto == "icmp" else (dport, sport)
        p, seg = segment(v, proto, a[bsrc], a[bdst], *back, payload, reply=True,
                         udp_zero=udp_zero)
        out.append((bingress, ip_packet(a[bsrc], a[bdst], p, seg), True))
    elif kind == "fragment":
        p, seg = segment(v, proto, a[fsrc], a[fdst], sport, dport, payload)
        first = draw(st.booleans())
        pkt = ip_packet(a[fsrc], a[fdst], p, seg if first else payload, frag=0 if first else 3,
                        more=first or draw(st.booleans()), ident=draw(st.integers(0, 3)))
        out.append((ingress, pkt, True))
    else:
        icmp = ICMP if v == 4 else ICMP6
        if kind == "error far":
            # About the translated first packet, from beyond the far end, to its sender.
            qsrc, qdst, qports, reply = osrc, odst, (sport, dport), False
            via = bingress
            outer_src = a[draw(st.sampled_from([bsrc, "router", "connector"]))]
            outer_dst = a[fsrc]
        else:
            # About a translated return packet, from its receiver.
            qsrc, qdst = FLOWS_RETURN_OUT[(fsrc, fdst)]
            qports, reply = ((sport, dport) if proto == "icmp" else (dport, sport)), True
            via, outer_src, outer_dst = ingress, a[fsrc], a[qsrc]
        p, qseg = segment(v, proto, a[qsrc], a[qdst], *qports, payload, reply=reply,
                          udp_zero=udp_zero)
        quoted = ip_packet(a[qsrc], a[qdst], p, qseg)
        quoted = quoted[: draw(st.sampled_from([len(quoted), 28, 48, 64]))]
        msg = icmp_error(v, outer_src, outer_dst, draw(st.integers(0, 5)), quoted)
        out.append((via, ip_packet(outer_src, outer_dst, icmp, msg), True))
    return out


# A flow's return packet as its receiver sees it (after translation): the client's magic IP
# answers it; at the connector, the transit IP does.
FLOWS_RETURN_OUT = {("self", "magic"): ("magic", "self"),
                    ("client", "transit_b"): ("transit_b", "client")}


@st.composite
def mutated(draw: st.DrawFn, packets: st.SearchStrategy) -> list[tuple[Ingress, bytes]]:
    """The packets, the mutable ones clean now and then, else with bytes changed or cut."""
    out = []
    for ingress, pkt, mutable in draw(packets):
        if mutable and draw(st.integers(0, 2)):
            buf = bytearray(pkt)
            for pos, value in draw(st.lists(st.tuples(st.integers(0, 120),
                                                      st.integers(0, 255)), max_size=4)):
                if pos < len(buf):
                    buf[pos] = value
            pkt = bytes(buf[: draw(st.none() | st.integers(0, len(buf)))])
            pkt += draw(st.binary(max_size=8))
        out.append((ingress, pkt))
    return out


@FUZZ
@given(st.lists(mutated(flow_packets()), min_size=1, max_size=4))
def test_datapath_translations_keep_checksums(
    packets: list[list[tuple[Ingress, bytes]]],
) -> None:
    """Never a crash; a documented verdict; whatever is translated has verifying checksums."""
    dp = make_datapath()
    for group in packets:
        for ingress, pkt in group:
            run_packet(dp, ingress, pkt)


def test_datapath_translates_the_fuzzed_flows() -> None:
    """The fuzz target's set-up really translates, both roles and both families.

    Otherwise the checksum property above would hold vacuously.
    """
    dp = make_datapath()
    for v in (4, 6):
        a = ADDR[v]
        for proto in (TCP, UDP):
            for ingress, src, dst in LEGS:
                s, d = a[src], a[dst]
                pkt = ip_packet(s, d, proto, l4(proto, s, d, 40000 if src in ("self", "client")
                                                 else 443, 443 if src in ("self", "client")
                                                 else 40000, b"x"))
                verdict, out = run_packet(dp, ingress, pkt)
                assert verdict == ("peer" if ingress == "tun" else "tun"), (v, proto, src, dst)
                verified = checks(out)
                assert out != pkt and verified["l4"] and verified.get("ip", True)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["tun", CONN_EP, CLIENT_EP, ("192.0.2.9", 1)]),
       st.booleans())
@example(b"\x45", "tun", False)
@example(b"\x60" + b"\0" * 39, CLIENT_EP, True)
@example(b"", CONN_EP, False)
def test_datapath_survives_raw_bytes(data: bytes, ingress: Ingress, framed: bool) -> None:
    """Arbitrary bytes, raw or sealed in a transport message: a documented verdict,
    never a crash."""
    dp = make_datapath()
    if ingress == "tun" or framed:
        run_packet(dp, ingress, data)
    else:
        verdict, out, _ = dp.process_datagram(data, ingress, NOW_MS)
        assert verdict in VERDICTS and isinstance(out, bytes)


@FUZZ
@given(st.binary(min_size=1, max_size=120),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, 200))
def test_a_mutated_datagram_is_dropped_and_changes_no_session(payload: bytes,
                                                               flips: list[tuple[int, int]],
                                                               cut: int) -> None:
    """A genuine transport message with bytes changed or cut off: never delivered,
    and the session is as before (window, endpoint, byte counts): the genuine
    message still opens afterwards."""
    dp = make_datapath()
    genuine = REMOTES[CLIENT_EP].seal(ip_packet(ADDR[4]["client"], ADDR[4]["transit_b"], 17,
                                                l4(17, ADDR[4]["client"], ADDR[4]["transit_b"],
                                                   40000, 443, payload)))
    bad = bytearray(genuine)
    for pos, mask in flips:
        bad[pos % len(bad)] ^= mask
    bad = bad[:len(bad) - cut % len(bad)] if cut % 3 == 0 else bad
    assume(bytes(bad) != genuine)  # flips that cancel out leave the genuine message
    before = dp.peer_state(CLIENT_PEER)
    verdict, out, _ = dp.process_datagram(bytes(bad), ("198.51.100.1", 9), NOW_MS)
    assert verdict in {"drop", "handshake"} and out == b""
    assert dp.peer_state(CLIENT_PEER)["endpoint"] == before["endpoint"]
    assert dp.peer_state(CLIENT_PEER)["rx_bytes"] == before["rx_bytes"] == 0
    assert dp.process_datagram(genuine, CLIENT_EP, NOW_MS)[0] == "tun"


# -- target b: the DNS mapper ---------------------------------------------------------------------

WILD = App("Wild", ("*.wild.example.test.", "exact.example.test."), ("tag:wild",))
DNS_POOLS = Pools(
    v4_magic=IPSet.of([IPRange.parse("100.80.0.0-100.80.0.255")]),
    v6_magic=IPSet.of([IPRange.parse("fd7a:115c:a1e0:ab12::-fd7a:115c:a1e0:ab12::ff")]),
    v4_transit=IPSet.of([IPRange.parse("169.254.128.0-169.254.128.255")]),
    v6_transit=IPSet.of([IPRange.parse("fd7a:115c:a1e0:ab13::-fd7a:115c:a1e0:ab13::ff")]),
)
APP_TAILS = [(b"wild", b"example", b"test"), (b"WILD", b"Example", b"TEST"),
             (b"exact", b"example", b"test")]
ODD_BYTES = st.sampled_from([b"\0", b".", b"@", b"\x80", b"\xff", b"\\", b"*", b" ", b"A", b"-"])
ODD_LABEL = st.lists(ODD_BYTES | st.binary(min_size=1, max_size=3), min_size=1,
                     max_size=6).map(lambda parts: b"".join(parts)[:63])


def dns_mapper() -> DNSMapper:
    node = Member("laptop", (ip("100.64.0.1"),), ("192.0.2.1", 41641), public_key("laptop"))
    config = NodeConfig(tailnet=Tailnet(nodes=(node,)), node=node, advertise_connector=False,
                        apps=(WILD,), pools=DNS_POOLS, app_users=frozenset({node.name}))
    return DNSMapper(config, Assignments(DNS_POOLS))


def label_name(labels: tuple[bytes, ...]) -> DNSQuestion:
    q = DNSQuestion()
    q.qname = list(labels)
    return q


@st.composite
def app_names(draw: st.DrawFn) -> tuple[bytes, ...]:
    """A name whose labels end in an app domain's, its other labels any bytes."""
    tail = draw(st.sampled_from(APP_TAILS))
    head = draw(st.lists(ODD_LABEL, max_size=3))
    if tail[0].lower() == b"exact":
        head = []
    return (*head, *tail)


def _rr(owner: tuple[bytes, ...], kind: str, value: object, rclass: int = CLASS.IN) -> RR:
    rdata = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "TXT": TXT}[kind](value)
    return RR(owner, getattr(QTYPE, kind), rclass, 60, rdata)


@st.composite
def upstream_answers(draw: st.DrawFn) -> tuple[bytes, tuple[bytes, ...]]:
    """A response to an app name: chains, other owners, wrong classes, several questions."""
    name = draw(app_names())
    qtype = draw(st.sampled_from(["A", "AAAA", "HTTPS", "TXT"]))
    other = (b"cdn", b"example", b"net")
    owners = st.sampled_from([name, other, (b"x", *other)])
    records = []
    for kind, owner, rclass in draw(st.lists(st.tuples(
            st.sampled_from(["A", "AAAA", "CNAME", "TXT"]), owners,
            st.sampled_from([CLASS.IN, CLASS.IN, CLASS.CH, 255])), max_size=6)):
        value = {"A": "203.0.113.7", "AAAA": "2001:db8::7",
                 "CNAME": draw(owners), "TXT": "t"}[kind]
        records.append(_rr(owner, kind, value, rclass))
    if qtype == "HTTPS":
        hint = [(4, ip("203.0.113.7").packed), (6, ip("2001:db8::7").packed), (1, b"\x02h2")]
        records.append(RR(name, QTYPE.HTTPS, CLASS.IN, 60,
                          HTTPS(1, [], [(k, bytearray(v)) for k, v in hint])))
    questions = [label_name(name)]
    questions[0].qtype = getattr(QTYPE, qtype)
    for extra in draw(st.lists(st.sampled_from([(b"plain", b"example", b"org"), name]),
                               max_size=2)):
        questions.append(label_name(extra))
    msg = DNSRecord(DNSHeader(id=0x4242, qr=1, rd=1, ra=1), questions=questions, rr=records)
    return bytes(msg.pack()), name


def magic(addr: bytes) -> bool:
    a = ipaddress.ip_address(addr)
    return a in DNS_POOLS.magic(a.version)


def app_question_readable(wire: bytes) -> bool:
    """Some class-IN question that can be read, before the first that cannot, is an app's."""
    for labels, _, qclass in dnswire.questions(wire)[0]:
        low = tuple(x.lower() for x in labels)
        exact = low == (b"exact", b"example", b"test")
        if qclass == CLASS.IN and (exact or low[-3:] == (b"wild", b"example", b"test")):
            return True
    return False


@FUZZ
@given(upstream_answers(), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)),
                                    max_size=4), st.none() | st.integers(12, 300))
@example((b"BB\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x01\x01\x04wild\x07example\x04test\x00"
          b"\x00\x01\x00\x01\xc0\x0c\x00\x01\x00\x01\x00\x00\x00<\x00\x04\xcb\x00q\x07",
          (b"\x01", b"wild", b"example", b"test")), [], None)
@example((b"BB\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x03a.b\x04wild\x07example\x04test\x00"
          b"\x00\x01\x00\x01\xc0\x0c\x00\x01\x00\x01\x00\x00\x00<\x00\x04\xcb\x00q\x07",
          (b"a.b", b"wild", b"example", b"test")), [], None)
def test_dns_answers_for_app_names_never_carry_real_addresses(
    answer: tuple[bytes, tuple[bytes, ...]], edits: list[tuple[int, int]], cut: int | None,
) -> None:
    """A response with a question under an app domain: mapped or SERVFAIL, never real."""
    wire, _ = answer
    buf = bytearray(wire)
    for pos, value in edits:
        if pos < len(buf):
            buf[pos] = value
    mutated_wire = bytes(buf[:cut])
    mapper = dns_mapper()
    res = mapper.map_response(mutated_wire, 1_700_000_000.0)
    assert isinstance(res.wire, bytes)
    # Whether it is the app's is judged here independently, on the labels as a stub reads them.
    assert res.ours == app_question_readable(mutated_wire), mutated_wire.hex()
    assert (mapper.app_for_query(mutated_wire) is not None) == res.ours
    if not res.ours:
        assert res.wire == mutated_wire
        return
    if res.servfail:
        assert res.wire[3] & 0xF == 2
        assert struct.unpack_from("!HHH", res.wire, 6) == (0, 0, 0)  # no records at all
        return
    addresses = dnswire.address_data(res.wire)
    assert all(len(a) in (4, 16) and magic(a) for a in addresses), (mutated_wire.hex(),
                                                                    res.wire.hex())


_MAPPED_TYPES = frozenset((QTYPE.A, QTYPE.AAAA, QTYPE.CNAME, QTYPE.HTTPS))


def dnslib_answer(wire: bytes) -> tuple[dnsname.Labels, int, list] | None:
    """(question labels, qtype, [(address, ttl)]) of a one-question answer, its records
    read by dnslib (every name, and the data of the types the mapper uses), the CNAME
    chain followed; None where dnslib cannot read a record. The reference for the
    mapper's own record reader."""
    try:
        head = parse_head(wire)
        if not head.complete or len(head.questions) != 1 or head.questions[0].size > 255:
            return None
        buf = DNSBuffer(wire)
        buf.offset = head.end
        records = []
        for _ in range(struct.unpack_from("!H", wire, 6)[0]):
            rname = buf.decode_name()
            rtype, rclass, ttl, rdlength = buf.unpack("!HHIH")
            end = buf.offset + rdlength
            if end > len(wire):
                return None
            if rtype in _MAPPED_TYPES:
                if not rdlength:
                    return None
                rdata = RDMAP.get(QTYPE.get(rtype), RD).parse(buf, rdlength)
                if buf.offset != end:
                    return None
                records.append(RR(rname, rtype, rclass, ttl, rdata))
            buf.offset = end
    except Exception:
        return None

    def key(label: DNSLabel) -> tuple[bytes, ...]:
        return tuple(x.lower() for x in label.label)

    q = head.questions[0]
    cnames: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
    for rr in records:
        if rr.rtype == QTYPE.CNAME and rr.rclass == CLASS.IN:
            cnames.setdefault(key(rr.rname), key(rr.rdata.label))
    name = tuple(x.lower() for x in q.labels)
    chain = {name}
    while name in cnames:
        name = cnames[name]
        if name in chain or len(chain) > MAX_CHAIN:
            return q.labels, q.qtype, []
        chain.add(name)
    out: dict = {}
    if q.qtype in (QTYPE.A, QTYPE.AAAA):
        for rr in records:
            if rr.rtype == q.qtype and rr.rclass == CLASS.IN and key(rr.rname) in chain:
                out.setdefault(ipaddress.ip_address(bytes(rr.rdata.data)),
                               rr.ttl if rr.ttl < 2**31 else 0)
    return q.labels, q.qtype, list(out.items())


@FUZZ
@given(upstream_answers(), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)),
                                    max_size=6), st.none() | st.integers(12, 300))
def test_answers_are_read_and_written_as_dnslib_reads_and_writes_them(
    answer: tuple[bytes, tuple[bytes, ...]], edits: list[tuple[int, int]], cut: int | None,
) -> None:
    """The connector's and the mapper's record reader finds the addresses dnslib's finds
    (or fails where it fails), and an answer of addresses is written byte for byte as
    dnslib writes it."""
    buf = bytearray(answer[0])
    for pos, value in edits:
        if pos < len(buf):
            buf[pos] = value
    wire = bytes(buf[:cut])
    ref = dnslib_answer(wire)
    try:
        got = answer_addresses(wire)
    except DNSMapError:
        got = None
    if ref is None:
        assert got is None, wire.hex()
    elif got is None:  # the question is not class IN, or has no text form
        q = parse_head(wire).questions[0]
        try:
            dnsname.from_labels(q.labels)
            assert q.qclass != CLASS.IN, wire.hex()
        except ValueError:
            pass
    else:
        assert got[1:] == ref[1:], wire.hex()
    res = dns_mapper().map_response(wire, 1_700_000_000.0)
    if not res.ours or res.servfail or ref is None or not ref[2]:
        return
    head = parse_head(wire)
    q = head.questions[0]
    rdata = A if q.qtype == QTYPE.A else AAAA
    want = DNSRecord(DNSHeader(id=head.id, bitmap=head.flags & ~0x20),
                     questions=[DNSQuestion(DNSLabel(q.labels), q.qtype, q.qclass)],
                     rr=[RR(DNSLabel(q.labels), q.qtype, CLASS.IN, ttl, rdata(str(a.magic)))
                         for a, (_, ttl) in zip(res.assignments, ref[2], strict=True)])
    assert res.wire == bytes(want.pack()), wire.hex()


@FUZZ
@given(upstream_answers(), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)),
                                    max_size=4), st.none() | st.integers(0, 300), st.booleans())
def test_dns_helpers_raise_only_their_error(
    answer: tuple[bytes, tuple[bytes, ...]], edits: list[tuple[int, int]], cut: int | None,
    as_query: bool,
) -> None:
    """The connector's readers of queries and answers, and servfail(): DNSMapError or a value."""
    buf = bytearray(answer[0])
    if as_query:
        buf[2] &= 0x7F  # QR off
    for pos, value in edits:
        if pos < len(buf):
            buf[pos] = value
    wire = bytes(buf[:cut])
    for call in (answer_addresses, query_question, servfail):
        try:
            out = call(wire)
        except DNSMapError:
            continue
        if call is servfail:
            assert isinstance(out, bytes) and out[3] & 0xF == 2
            assert struct.unpack_from("!HHH", out, 6) == (0, 0, 0)


# -- target c: the peer API decoders ---------------------------------------------------------------

VALID_BODY = json.dumps({"transitIPs": [
    {"transitIP": "169.254.128.1", "destinationIP": "203.0.113.1", "app": "GitHub",
     "domain": "api.github.com"},
    {"transitIP": "fd7a:115c:a1e0:ab13::1", "destinationIP": "2001:db8::1", "app": "GitHub"},
]}).encode()
VALID_RESPONSE = b'{"transitIPs":[{"code":0,"message":""},{"code":1,"message":"no"}]}'
VALID_HEALTH = b'{"advertisesConnector":true,"apps":["GitHub"],"node":"gh-1"}'
VALID_RESOLVE = json.dumps({"queries": [
    {"app": "GitHub", "query": "EjQBAAABAAAAAAAAA2FwaQZnaXRodWIDY29tAAABAAE=",
     "transitIPs": ["169.254.128.1", "fd7a:115c:a1e0:ab13::1"],
     "assigned": [{"transitIP": "169.254.128.2", "destinationIP": "203.0.113.1"}]},
    {"app": "GitHub", "query": ""},
]}).encode()
VALID_RESOLVED = json.dumps({"answers": [
    {"answer": "EjQ=", "transitIPs": [{"transitIP": "169.254.128.1",
                                       "destinationIP": "203.0.113.1"}]},
    {"status": 404, "message": "no"},
]}).encode()

DECODERS: list[tuple[Callable[[bytes], object], type, bytes]] = [
    (peerapi.decode_transit_request, peerapi.ConnectorTransitIPRequest, VALID_BODY),
    (peerapi.decode_transit_response, peerapi.ConnectorTransitIPResponse, VALID_RESPONSE),
    (peerapi.decode_health, peerapi.HealthResponse, VALID_HEALTH),
    (peerapi.decode_resolve_request, peerapi.ResolveRequest, VALID_RESOLVE),
    (peerapi.decode_resolve_response, peerapi.ResolveResponse, VALID_RESOLVED),
]
JSON_KEYS = st.text(max_size=5) | st.sampled_from([
    "transitIPs", "transitIP", "destinationIP", "app", "domain", "code", "message", "apps", "node",
    "advertisesConnector", "queries", "query", "assigned", "answers", "answer", "status"])


def _json_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(JSON_KEYS, inner, max_size=4)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["169.254.128.1", "2001:db8::1", "fe80::1%eth0",
                                              "x@y.github.com", "a" * 300, "\0", "\ud800"]),
    _json_containers,
    max_leaves=12,
)


def _check_decode(decode: Callable[[bytes], object], kind: type, body: bytes) -> None:
    try:
        value = decode(body)
    except peerapi.BadRequest as e:
        assert str(e)
        return
    assert isinstance(value, kind)
    if isinstance(value, peerapi.ConnectorTransitIPRequest):
        for item in value.transit_ips:  # canonical text: the typed views must work
            assert item.transit.version in (4, 6) and item.destination.version in (4, 6)
        assert peerapi.decode_transit_request(peerapi.encode(value)) == value
    if isinstance(value, peerapi.ResolveRequest):
        for q in value.queries:  # what the connector reads of an item must work
            offered = q.offers + list(q.assigned_by_address.values())
            assert len(set(offered)) == len(offered) <= peerapi.MAX_OFFERS
        assert peerapi.decode_resolve_request(peerapi.encode(value)) == value
    if isinstance(value, peerapi.ResolveResponse):  # a client takes only what it offered
        for answer in value.answers:
            assert not peerapi.acknowledged(answer, [])


@FUZZ
@given(st.sampled_from(DECODERS), st.binary(max_size=300))
@example(DECODERS[0], b'{"transitIPs":[{"transitIP":"169.254.128.1","destinationIP":'
                      b'"203.0.113.1","app":"A","domain":"x@y.github.com"}]}')
def test_peerapi_decoders_on_arbitrary_bytes(
    decoder: tuple[Callable[[bytes], object], type, bytes], body: bytes,
) -> None:
    """Arbitrary bytes give a typed value or BadRequest, never another exception."""
    _check_decode(*decoder[:2], body)


@FUZZ
@given(st.sampled_from(DECODERS), st.lists(st.tuples(st.integers(0, 250), st.integers(0, 255)),
                                           max_size=4),
       st.none() | st.integers(0, 250), JSON_VALUES)
def test_peerapi_decoders_on_mutated_json(
    decoder: tuple[Callable[[bytes], object], type, bytes], edits: list[tuple[int, int]],
    cut: int | None, splice: object,
) -> None:
    """Valid bodies with bytes flipped, cut short, or a value replaced by arbitrary JSON."""
    decode, kind, valid = decoder
    buf = bytearray(valid)
    for pos, value in edits:
        if pos < len(buf):
            buf[pos] = value
    _check_decode(decode, kind, bytes(buf[:cut]))
    doc = json.loads(valid)
    key = next(iter(doc))
    for replaced in ({key: splice}, {**doc, key: [splice]}, splice):
        try:
            body = json.dumps(replaced).encode()
        except (TypeError, ValueError, UnicodeEncodeError):
            continue
        _check_decode(decode, kind, body)
    items = doc.get("transitIPs") or doc.get("queries") or doc.get("answers")
    if isinstance(items, list) and items:
        item = dict(items[0])
        item[next(iter(item))] = splice
        try:
            body = msgspec.json.encode({key: [item]})
        except (TypeError, ValueError, UnicodeEncodeError):
            return
        _check_decode(decode, kind, body)
