"""The datapath's per-packet decisions, end to end through the C code, without devices.

each case feeds a packet to Datapath.process_from_tun or
process_datagram (exactly what the pumps call) and checks the verdict and
the bytes against scapy's independent rebuild. Datagrams from the peer are
sealed by the reference WireGuard transport (wgsessions) under the session
each fixture installs.
"""

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import IPv6

import wgsessions
from conn25.core.iprange import IPRange
from conn25.fastpath import Datapath, EventKind, Role

NOW = 1_000_000
CLIENT, CONNECTOR = "100.64.0.1", "100.64.0.2"
CLIENT_EP, CONNECTOR_EP = ("192.0.2.1", 41641), ("192.0.2.2", 41641)
MAGIC, TRANSIT, REAL = "100.80.0.5", "169.254.128.5", "203.0.113.10"
MAGIC6, TRANSIT6, REAL6 = "fd7a:115c:a1e0:ab12::5", "fd7a:115c:a1e0:ab13::5", "2001:db8::10"
CLIENT6, CONNECTOR6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
CONN_PEER, CLIENT_PEER = 2, 1
# Each fixture's datapath holds `OURS` for its peer; the test plays that peer.
OURS, THEIRS = wgsessions.pair()
PEER = wgsessions.Remote(THEIRS)


def packed(a):
    return ipaddress.ip_address(a).packed


def rebuilt(pkt):
    """scapy's own serialisation with every checksum recomputed from scratch."""
    p = pkt.__class__(bytes(pkt))
    for layer in (IP, TCP, UDP, ICMP, IPerror, UDPerror):
        if layer in p:
            for f in ("chksum",):
                if hasattr(p[layer], f):
                    del p[layer].chksum
    return bytes(p.__class__(bytes(p)))


@pytest.fixture
def client():
    dp = Datapath(client=True)
    dp.tables.set_local([packed(CLIENT), packed(CLIENT6)])
    dp.tables.set_peer(CONN_PEER, packed(CONNECTOR_EP[0]), CONNECTOR_EP[1], [packed(CONNECTOR)])
    dp.tables.set_magic_ranges([IRange("100.80.0.0/16"), IRange("fd7a:115c:a1e0:ab12::/64")])
    dp.tables.set_magic(packed(MAGIC), packed(TRANSIT))
    dp.tables.set_route(packed(TRANSIT), CONN_PEER)
    wgsessions.install(dp, CONN_PEER, OURS, NOW)
    return dp


@pytest.fixture
def connector():
    dp = Datapath(client=False, connector=True)
    dp.tables.set_local([packed(CONNECTOR), packed(CONNECTOR6)])
    dp.tables.set_peer(CLIENT_PEER, packed(CLIENT_EP[0]), CLIENT_EP[1],
                       [packed(CLIENT), packed(CLIENT6)])
    dp.tables.set_transit_ranges([IRange("169.254.128.0/17"), IRange("fd7a:115c:a1e0:ab13::/64")])
    dp.tables.set_transit(CLIENT_PEER, packed(TRANSIT), packed(REAL), 3)
    dp.tables.set_transit(CLIENT_PEER, packed(TRANSIT6), packed(REAL6), 3)
    wgsessions.install(dp, CLIENT_PEER, OURS, NOW)
    return dp


def IRange(text):
    return IPRange.parse(text)


def dg(pkt):
    """`pkt` as the fixture's peer sends it (a fresh counter each time)."""
    return PEER.seal(bytes(pkt))


def syn(src=CLIENT, dst=MAGIC, sport=40000, dport=443):
    return IP(src=src, dst=dst, ttl=64) / TCP(sport=sport, dport=dport, flags="S", seq=1)


def test_not_a_magic_ip_is_plain_overlay_traffic(client):
    """Untouched; routed by destination, or dropped without a route."""
    to_peer = IP(src=CLIENT, dst=CONNECTOR) / UDP(sport=1, dport=2) / b"x"
    verdict, out, peer = client.process_from_tun(bytes(to_peer), NOW)
    assert (verdict, out, peer) == ("peer", bytes(to_peer), CONN_PEER)
    verdict, out, _ = client.process_from_tun(bytes(syn(dst="198.51.100.1")), NOW)
    assert verdict == "drop"
    c = client.counters()
    assert c["forwarded"] == 1 and c["drop_no_route"] == 1 and c["translated"] == 0


@pytest.mark.parametrize(("magic", "src"),
                         [("100.80.0.99", CLIENT), ("fd7a:115c:a1e0:ab12::99", CLIENT6)])
def test_magic_ip_without_assignment_gets_icmp_unreachable_from_the_magic_ip(client, magic, src):
    """Drop, and host unreachable (v6: address unreachable) back into the TUN."""
    if ":" in magic:
        pkt = IPv6(src=src, dst=magic) / TCP(sport=40000, dport=443, flags="S")
    else:
        pkt = syn(src=src, dst=magic)
    verdict, out, _ = client.process_from_tun(bytes(pkt), NOW)
    assert verdict == "reply"
    if ":" in magic:
        reply = IPv6(out)
        assert (reply.src, reply.dst) == (magic, src)
        assert (reply[1].type, reply[1].code) == (1, 3)
    else:
        reply = IP(out)
        assert (reply.src, reply.dst, reply[ICMP].type, reply[ICMP].code) == (magic, src, 3, 1)
        assert bytes(reply) == rebuilt(reply)
    assert client.counters()["unmapped_magic"] == 1


def test_client_translates_magic_to_transit_and_back(client):
    """Destination becomes the transit IP, ports kept; the return is translated back."""
    verdict, out, peer = client.process_from_tun(bytes(syn()), NOW)
    assert (verdict, peer) == ("peer", CONN_PEER)
    sent = IP(out)
    assert (sent.src, sent.dst, sent[TCP].sport, sent[TCP].dport) == (CLIENT, TRANSIT, 40000, 443)
    assert bytes(sent) == rebuilt(sent)

    reply = IP(src=TRANSIT, dst=CLIENT) / TCP(sport=443, dport=40000, flags="SA", ack=2)
    verdict, out, _ = client.process_datagram(dg(reply), CONNECTOR_EP, NOW)
    assert verdict == "tun"
    back = IP(out)
    assert (back.src, back.dst, back[TCP].sport, back[TCP].dport) == (MAGIC, CLIENT, 443, 40000)
    assert bytes(back) == rebuilt(back)
    events = client.read_events()
    assert [(e.kind, e.role, e.transit) for e in events] == [
        (EventKind.FLOW_CREATED, Role.CLIENT, packed(TRANSIT))]


def test_client_without_a_route_for_the_transit_drops(client):
    """A magic IP whose transit IP is not registered with a connector yet: no send."""
    client.tables.del_route(packed(TRANSIT))
    verdict, _, _ = client.process_from_tun(bytes(syn()), NOW)
    assert verdict == "drop" and client.counters()["drop_no_route"] == 1


def test_established_flow_survives_a_mapping_change(client):
    """The second packet does not consult the magic table again."""
    client.process_from_tun(bytes(syn()), NOW)
    client.tables.del_magic(packed(MAGIC))
    client.tables.set_magic(packed(MAGIC), packed("169.254.128.77"))
    verdict, out, _ = client.process_from_tun(bytes(syn()), NOW + 1)
    assert verdict == "peer" and IP(out).dst == TRANSIT
    # a new flow (other source port) gets the new mapping
    client.tables.set_route(packed("169.254.128.77"), CONN_PEER)
    _, out, _ = client.process_from_tun(bytes(syn(sport=40001)), NOW + 2)
    assert IP(out).dst == "169.254.128.77"


def test_connector_translates_transit_to_real_and_back(connector):
    """Destination becomes the real IP; the return's source becomes the transit IP."""
    pkt = IP(src=CLIENT, dst=TRANSIT) / UDP(sport=5000, dport=53) / b"q"
    verdict, out, _ = connector.process_datagram(dg(pkt), CLIENT_EP, NOW)
    assert verdict == "tun"
    fwd = IP(out)
    assert (fwd.src, fwd.dst, fwd[UDP].dport) == (CLIENT, REAL, 53)
    assert bytes(fwd) == rebuilt(fwd)

    reply = IP(src=REAL, dst=CLIENT) / UDP(sport=53, dport=5000) / b"a"
    verdict, out, peer = connector.process_from_tun(bytes(reply), NOW)
    assert (verdict, peer) == ("peer", CLIENT_PEER)
    back = IP(out)
    assert (back.src, back.dst) == (TRANSIT, CLIENT)
    assert bytes(back) == rebuilt(back)
    [ev] = connector.read_events()
    assert (ev.kind, ev.role, ev.peer) == (EventKind.FLOW_CREATED, Role.CONNECTOR, CLIENT_PEER)


def test_connector_ipv6(connector):
    pkt = IPv6(src=CLIENT6, dst=TRANSIT6) / TCP(sport=1234, dport=443, flags="S")
    verdict, out, _ = connector.process_datagram(dg(pkt), CLIENT_EP, NOW)
    assert verdict == "tun" and IPv6(out).dst == REAL6
    expect = IPv6(src=CLIENT6, dst=REAL6) / TCP(sport=1234, dport=443, flags="S")
    assert out == bytes(expect)


def test_unmapped_transit_is_dropped_and_rejected_once(connector):
    """Drop, reject naming the transit IP to that peer (de-duplicated)."""
    pkt = IP(src=CLIENT, dst="169.254.128.9") / TCP(sport=1, dport=443, flags="S")
    verdict, inner, peer = connector.process_datagram(dg(pkt), CLIENT_EP, NOW)
    assert (verdict, peer) == ("reject", CLIENT_PEER)
    assert inner == bytes(pkt)  # the dropped packet, untranslated
    connector.process_datagram(dg(pkt), CLIENT_EP, NOW + 10)  # within the gap: no new event
    events = connector.read_events()
    assert [(e.kind, e.transit, e.peer) for e in events] == [
        (EventKind.UNMAPPED_TRANSIT, packed("169.254.128.9"), CLIENT_PEER)]
    assert connector.counters()["unmapped_transit"] == 2
    # a transit IP mapped for another peer only is unmapped for this one: same answer
    not_pool = IP(src=CLIENT, dst="198.51.100.9") / TCP(sport=1, dport=443)
    verdict, _, _ = connector.process_datagram(dg(not_pool), CLIENT_EP, NOW)
    # not a transit IP, nor one of the connector's addresses: a connector is not a router
    assert verdict == "drop" and connector.counters()["drop_dst_not_allowed"] == 1


def reject_packet(transit, src=CONNECTOR, dst=CLIENT):
    """A connector's reject as it travels inside the tunnel (wire.pxd): an IP packet of
    protocol 253 whose payload is the family byte and the transit IP, built here
    with scapy rather than by the datapath."""
    addr = ipaddress.ip_address(transit)
    payload = bytes([addr.version]) + addr.packed
    if ":" in src:
        return bytes(IPv6(src=src, dst=dst, nh=253, hlim=64) / payload)
    return bytes(IP(src=src, dst=dst, proto=253, ttl=64) / payload)


@pytest.mark.parametrize(("transit", "src", "dst"), [(TRANSIT, CONNECTOR, CLIENT),
                                                      (TRANSIT6, CONNECTOR6, CLIENT6)])
def test_reject_received_becomes_an_event(client, transit, src, dst):
    """A reject for T, from the connector's overlay address inside the tunnel, is
    reported to the control plane and goes no further."""
    client.tables.set_peer(CONN_PEER, packed(CONNECTOR_EP[0]), CONNECTOR_EP[1],
                           [packed(CONNECTOR), packed(CONNECTOR6)])
    client.tables.set_route(packed(transit), CONN_PEER)  # registered with that connector
    verdict, _, _ = client.process_datagram(dg(reject_packet(transit, src, dst)),
                                            CONNECTOR_EP, NOW)
    assert verdict == "drop"
    [ev] = client.read_events()
    assert (ev.kind, ev.role, ev.transit, ev.peer) == (
        EventKind.REJECT, Role.CLIENT, packed(transit), CONN_PEER)
    c = client.counters()
    assert (c["rejects_received"], c["tun_tx"], c["forwarded"]) == (1, 0, 0)


def test_a_reject_naming_a_transit_ip_of_another_connector_is_not_believed(client):
    """Only the connector a transit IP is registered with may reject it: from any other
    peer the reject is dropped as spoofed (else a member could make us re-register)."""
    client.tables.set_peer(CONN_PEER, packed(CONNECTOR_EP[0]), CONNECTOR_EP[1],
                           [packed(CONNECTOR), packed(CONNECTOR6)])
    client.tables.del_route(packed(TRANSIT6))
    assert client.process_datagram(dg(reject_packet(TRANSIT6, CONNECTOR6, CLIENT6)),
                                   CONNECTOR_EP, NOW)[0] == "drop"
    assert client.read_events() == []
    c = client.counters()
    assert (c["rejects_received"], c["drop_spoofed"]) == (0, 1)
    assert client.peer_state(CONN_PEER)["drops"]["spoofed"] == 1


def test_a_malformed_or_misaddressed_reject_is_no_event(client):
    """Truncated, of an unknown family, or to an address not ours: no re-registration."""
    good = reject_packet(TRANSIT)
    truncated = bytes(IP(src=CONNECTOR, dst=CLIENT, proto=253) / bytes([4, 169, 254]))
    bad_family = bytes(IP(src=CONNECTOR, dst=CLIENT, proto=253) / (bytes([5]) + good[21:]))
    for pkt in (truncated, bad_family):
        assert client.process_datagram(dg(pkt), CONNECTOR_EP, NOW)[0] == "drop"
    assert client.counters()["drop_malformed"] == 2
    elsewhere = reject_packet(TRANSIT, dst="100.64.0.77")
    assert client.process_datagram(dg(elsewhere), CONNECTOR_EP, NOW)[0] == "drop"
    assert client.read_events() == []
    assert client.counters()["rejects_received"] == 0


def test_anti_spoofing(connector):
    """Cryptokey routing: a datagram under no session of ours, one that does not
    authenticate, and one whose inner source is not the peer's are dropped and
    counted; where it came from on the underlay does not matter (roaming)."""
    pkt = IP(src=CLIENT, dst=TRANSIT) / UDP(sport=5000, dport=53)
    _, stranger = wgsessions.pair(local_index=0x5555, remote_index=0x6666)
    assert connector.process_datagram(
        wgsessions.Remote(stranger).seal(bytes(pkt)), CLIENT_EP, NOW)[0] == "drop"
    _, forger = wgsessions.pair(key_in=bytes(32))  # our index, another key
    assert connector.process_datagram(
        wgsessions.Remote(forger).seal(bytes(pkt), counter=10**6), CLIENT_EP, NOW)[0] == "drop"
    spoofed = IP(src=CONNECTOR, dst=TRANSIT) / UDP(sport=5000, dport=53)
    assert connector.process_datagram(dg(spoofed), CLIENT_EP, NOW)[0] == "drop"
    c = connector.counters()
    assert (c["drop_unknown_index"], c["drop_auth"], c["drop_spoofed"], c["translated"]) == (
        1, 1, 1, 0)
    # Only the datagram under no session is reported (the control plane may handshake
    # with whoever is at that endpoint: a peer that restarted), with where it came from.
    [ev] = connector.read_events()
    assert (ev.kind, ipaddress.ip_address(ev.transit), ev.peer) == (
        EventKind.UNKNOWN_SESSION, ipaddress.ip_address(CLIENT_EP[0]), CLIENT_EP[1])
    # the same packet, sealed right, from an address never seen: accepted
    assert connector.process_datagram(dg(pkt), ("192.0.2.66", 9999), NOW)[0] == "tun"


@pytest.mark.parametrize("datagram", [
    b"", b"\x04", b"\x04\x00\x00\x00" + bytes(27),         # too short for transport data
    b"\x04\x01\x00\x00" + bytes(40),                        # reserved bytes not zero
    b"\x05\x00\x00\x00" + bytes(40), b"\x00" * 48,          # no such type
    b"\x01\x00\x00\x00" + bytes(143), b"\x02\x00\x00\x00" + bytes(89),  # wrong sizes
    b"\x03\x00\x00\x00" + bytes(61)])
def test_bad_datagrams_are_dropped_and_counted(connector, datagram):
    verdict, _, _ = connector.process_datagram(datagram, CLIENT_EP, NOW)
    assert verdict == "drop"
    c = connector.counters()
    assert (c["drop_bad_header"], c["udp_rx"], c["handshakes_received"]) == (1, 1, 0)


def test_icmp_frag_needed_from_a_router_reaches_the_client_as_from_the_transit_ip(connector):
    """A router's error about a translated flow is translated, quoted packet included,
    and its outer source becomes the transit IP so that the client accepts it."""
    out_pkt = IP(src=CLIENT, dst=TRANSIT, flags="DF") / TCP(sport=40000, dport=443, flags="A")
    _, fwd, _ = connector.process_datagram(dg(out_pkt / (b"x" * 100)), CLIENT_EP, NOW)
    quoted = IP(fwd)
    err = IP(src="198.51.100.254", dst=CLIENT) / ICMP(type=3, code=4, nexthopmtu=1280) / \
        bytes(quoted)[:28]
    verdict, out, peer = connector.process_from_tun(bytes(err), NOW)
    assert (verdict, peer) == ("peer", CLIENT_PEER)
    got = IP(out)
    assert (got.src, got.dst) == (TRANSIT, CLIENT)
    assert (got[IPerror].src, got[IPerror].dst) == (CLIENT, TRANSIT)
    assert bytes(got) == rebuilt(got)


def test_garbage_never_crashes(client, connector):
    import random

    rng = random.Random(25)
    for _ in range(2000):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 80)))
        junk = bytes([0x45 if rng.random() < 0.5 else 0x60]) + junk
        client.process_from_tun(junk, NOW)
        connector.process_datagram(dg(junk), CLIENT_EP, NOW)
    assert client.counters()["tun_rx"] == 0  # process_* are not pump reads
    # every one of them opened (the bytes were junk, the crypto was not)
    c = connector.counters()
    assert (c["drop_auth"], c["drop_replay"], c["drop_unknown_index"]) == (0, 0, 0)


# -- a node is not a router and flows come back after a restart --


def test_connector_delivers_from_the_overlay_only_to_itself_or_through_a_mapping(connector):
    """No exit node. Its own address: delivered; any other untranslated one: dropped."""
    own = IP(src=CLIENT, dst=CONNECTOR) / TCP(sport=1, dport=41642, flags="S")
    assert connector.process_datagram(dg(own), CLIENT_EP, NOW)[:2] == ("tun", bytes(own))
    for dst in ("198.51.100.10", "100.64.0.9", "100.100.100.100"):
        out = connector.process_datagram(dg(syn(dst=dst)), CLIENT_EP, NOW)
        assert out[0] == "drop", dst
    six = IPv6(src=CLIENT6, dst="2001:db8:100::10") / UDP(sport=1, dport=2)
    assert connector.process_datagram(dg(six), CLIENT_EP, NOW)[0] == "drop"
    c = connector.counters()
    assert c["drop_dst_not_allowed"] == 4 and c["forwarded"] == 1 and c["translated"] == 0


def test_client_delivers_from_the_overlay_only_to_itself(client):
    """A peer's packets to the client's DNS listen address or a magic IP go nowhere."""
    for dst in ("100.100.100.100", MAGIC, "198.51.100.10"):
        pkt = IP(src=CONNECTOR, dst=dst) / UDP(sport=1, dport=53) / b"q"
        assert client.process_datagram(dg(pkt), CONNECTOR_EP, NOW)[0] == "drop", dst
    assert client.counters()["drop_dst_not_allowed"] == 3


@pytest.mark.parametrize("role", ["client", "connector"])
def test_packets_routed_into_the_tun_from_elsewhere_are_dropped(client, connector, role):
    """Toward the overlay only our own sources, unless a flow translated them."""
    dp = client if role == "client" else connector
    peer_addr = CONNECTOR if role == "client" else CLIENT
    forged = IP(src="198.51.100.7", dst=peer_addr) / UDP(sport=9, dport=9) / b"x"
    as_transit = IP(src=TRANSIT, dst=peer_addr) / UDP(sport=9, dport=9) / b"x"
    for pkt in (forged, as_transit, syn(src="203.0.113.9")):
        assert dp.process_from_tun(bytes(pkt), NOW)[0] == "drop"
    c = dp.counters()
    assert c["drop_src_not_allowed"] == 3 and c["forwarded"] == 0 and c["unmapped_magic"] == 0


def test_client_recreates_a_flow_from_a_return_packet(client):
    """After a restart the reply from T finds its magic IP; the flow is whole again."""
    reply = IP(src=TRANSIT, dst=CLIENT) / TCP(sport=443, dport=40000, flags="A", seq=7)
    verdict, out, _ = client.process_datagram(dg(reply), CONNECTOR_EP, NOW)
    assert verdict == "tun"
    back = IP(out)
    assert (back.src, back.dst, back[TCP].sport, back[TCP].dport) == (MAGIC, CLIENT, 443, 40000)
    assert bytes(back) == rebuilt(back)
    [ev] = client.read_events()
    assert (ev.kind, ev.role, ev.transit, ev.peer) == (
        EventKind.FLOW_CREATED, Role.CLIENT, packed(TRANSIT), CONN_PEER)
    # the application's next packet uses that flow: no second flow
    verdict, out, peer = client.process_from_tun(bytes(syn()), NOW + 1)
    assert (verdict, peer, IP(out).dst) == ("peer", CONN_PEER, TRANSIT)
    c = client.counters()
    assert c["flows_created"] == 1 and c["flows_from_return"] == 1 and c["client_flows"] == 1


def test_client_drops_untranslatable_packets_from_a_transit_ip(client):
    """An ICMP error from T with no flow, or a reply to another address: never untranslated."""
    err = IP(src=TRANSIT, dst=CLIENT) / ICMP(type=3, code=3) / IPerror(
        src=CLIENT, dst=TRANSIT) / UDPerror(sport=1, dport=2)
    assert client.process_datagram(dg(err), CONNECTOR_EP, NOW)[0] == "drop"
    assert client.counters()["drop_not_translatable"] == 1
    # a transit IP of no assignment is not the connector's to send from either
    other = IP(src="169.254.128.99", dst=CLIENT) / UDP(sport=1, dport=2)
    assert client.process_datagram(dg(other), CONNECTOR_EP, NOW)[0] == "drop"


def test_connector_recreates_a_flow_from_a_return_packet(connector):
    """A reply from R to the client, with (client, R) naming one transit IP."""
    reply = IP(src=REAL, dst=CLIENT) / TCP(sport=443, dport=40000, flags="A", seq=9)
    verdict, out, peer = connector.process_from_tun(bytes(reply), NOW)
    assert (verdict, peer) == ("peer", CLIENT_PEER)
    back = IP(out)
    assert (back.src, back.dst, back[TCP].sport, back[TCP].dport) == (TRANSIT, CLIENT, 443, 40000)
    assert bytes(back) == rebuilt(back)
    [ev] = connector.read_events()
    assert (ev.kind, ev.role, ev.transit, ev.peer) == (
        EventKind.FLOW_CREATED, Role.CONNECTOR, packed(TRANSIT), CLIENT_PEER)
    assert ev.flow.app == 3
    # the client's next packet to T is translated by that flow
    pkt = IP(src=CLIENT, dst=TRANSIT) / TCP(sport=40000, dport=443, flags="A")
    verdict, out, _ = connector.process_datagram(dg(pkt), CLIENT_EP, NOW + 1)
    assert verdict == "tun" and IP(out).dst == REAL
    assert connector.counters()["flows_created"] == 1


def test_connector_does_not_guess_between_two_transit_ips(connector):
    """Two transit IPs of one client map to R: a return packet cannot say which; dropped."""
    other = "169.254.128.6"
    connector.tables.set_transit(CLIENT_PEER, packed(other), packed(REAL), 3)
    reply = IP(src=REAL, dst=CLIENT) / TCP(sport=443, dport=40000, flags="A")
    assert connector.process_from_tun(bytes(reply), NOW)[0] == "drop"
    assert connector.counters()["drop_return_ambiguous"] == 1
    # with one of them gone, the other is the answer again
    connector.tables.del_transit(CLIENT_PEER, packed(TRANSIT))
    assert connector.tables.lookup_return(CLIENT_PEER, packed(REAL)) == (
        "hit", packed(other), 3)
    verdict, out, _ = connector.process_from_tun(bytes(reply), NOW)
    assert verdict == "peer" and IP(out).src == other


def test_reverse_maps_follow_their_forward_maps():
    """magic_for_transit and lookup_return stay in step with set/replace/delete."""
    t = Datapath(client=True, connector=True).tables
    m, t1, t2 = packed("100.80.0.1"), packed("169.254.128.1"), packed("169.254.128.2")
    t.set_magic(m, t1)
    assert t.magic_for_transit(t1) == m
    t.set_magic(m, t2)  # re-pointed: the old transit IP no longer names it
    assert (t.magic_for_transit(t1), t.magic_for_transit(t2)) == (None, m)
    t.del_magic(m)
    assert t.magic_for_transit(t2) is None
    c, r1, r2 = CLIENT_PEER, packed("198.51.100.1"), packed("198.51.100.2")
    t.set_transit(c, t1, r1, 1)
    assert t.lookup_return(c, r1) == ("hit", t1, 1)
    t.set_transit(c, t1, r2, 1)  # T re-registered to another destination
    assert t.lookup_return(c, r1) == ("not_ours", None, None)
    assert t.lookup_return(c, r2) == ("hit", t1, 1)
    t.set_transit(c, t2, r2, 1)
    t.set_transit(c, t2, r2, 1)  # the same registration again changes nothing
    assert t.lookup_return(c, r2)[0] == "ambiguous"
    # the remembered one goes: which remains is not known without a scan, so still no guess
    t.del_transit(c, t2)
    assert t.lookup_return(c, r2)[0] == "ambiguous"
    t.del_transit(c, t1)
    assert t.lookup_return(c, r2) == ("not_ours", None, None)
    assert t.stats()["real_rev"] == 0 and t.stats()["magic_rev"] == 0


def test_flows_a_return_packet_cannot_recreate_are_saved_and_restored(connector):
    """Two transit IPs of the client to one real address: the flows through them are
    saved; a restarted connector restores them while their mappings stand."""
    other = "169.254.128.6"
    connector.tables.set_transit(CLIENT_PEER, packed(other), packed(REAL), 3)
    connector.tables.set_transit(CLIENT_PEER, packed("169.254.128.7"), packed("203.0.113.77"), 3)
    for transit, sport in ((TRANSIT, 40000), (other, 40001), ("169.254.128.7", 40002)):
        pkt = IP(src=CLIENT, dst=transit) / TCP(sport=sport, dport=443, flags="S")
        assert connector.process_datagram(dg(pkt), CLIENT_EP, NOW)[0] == "tun"
    saved = connector.save_flows()
    # the flow to 203.0.113.77 re-creates itself from its replies: not saved
    assert len(saved) == 8 + 2 * 64

    def fresh() -> Datapath:
        dp = Datapath(client=False, connector=True)
        dp.tables.set_local([packed(CONNECTOR)])
        dp.tables.set_peer(CLIENT_PEER, packed(CLIENT_EP[0]), CLIENT_EP[1], [packed(CLIENT)])
        dp.tables.set_transit(CLIENT_PEER, packed(TRANSIT), packed(REAL), 3)
        return dp

    dp = fresh()
    dp.tables.set_transit(CLIENT_PEER, packed(other), packed(REAL), 3)
    assert dp.restore_flows(saved, NOW) == 2
    for sport, transit in ((40000, TRANSIT), (40001, other)):
        reply = IP(src=REAL, dst=CLIENT) / TCP(sport=443, dport=sport, flags="SA")
        verdict, out, _ = dp.process_from_tun(bytes(reply), NOW + 1)
        assert verdict == "peer" and IP(out).src == transit
        assert bytes(IP(out)) == rebuilt(IP(out))
    # a mapping that changed meanwhile takes its flow with it
    dp = fresh()
    dp.tables.set_transit(CLIENT_PEER, packed(other), packed("203.0.113.78"), 3)
    assert dp.restore_flows(saved, NOW) == 1
    for bad in (b"", b"junk", saved[:-1], b"C25F\x02\x00\x00\x00"):
        with pytest.raises(ValueError, match="saved-flows"):
            dp.restore_flows(bad, NOW)
    assert Datapath(client=True).save_flows() == b""
    connector.connector_flows.clear()  # removed flows are not saved
    assert connector.save_flows() == b""


def test_ambiguity_is_counted_as_mappings_come_and_go(connector):
    """save_flows looks at flows only while some (client, real) pair is ambiguous."""
    pkt = IP(src=CLIENT, dst=TRANSIT) / TCP(sport=40000, dport=443, flags="S")
    assert connector.process_datagram(dg(pkt), CLIENT_EP, NOW)[0] == "tun"
    assert connector.save_flows() == b""  # one flow, unambiguous: nothing to scan or save
    other = packed("169.254.128.6")
    connector.tables.set_transit(CLIENT_PEER, other, packed(REAL), 3)
    assert len(connector.save_flows()) == 8 + 64  # now its return cannot name it
    # the older one goes: the newer one is known to remain, so the pair is plain again
    connector.tables.del_transit(CLIENT_PEER, packed(TRANSIT))
    assert connector.save_flows() == b""
