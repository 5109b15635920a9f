"""The pure parts of the end-to-end tests' wire helpers (conn25.lab.wgmember and
conn25.lab.capture), without namespaces: what they build is what they claim to build."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from conn25.core.wireguard import keys
from conn25.core.wireguard.device import Device
from conn25.core.wireguard.errors import Rejected
from conn25.core.wireguard.messages import Transport
from conn25.core.wireguard.transport import pad
from conn25.lab.capture import parse_udp
from conn25.lab.wgmember import WgMember, _ip_cut

PACKET = bytes(IP(src="100.64.0.1", dst="100.64.0.2") / UDP(sport=1, dport=9) / b"conn25d")


SRC_A = bytes([192, 0, 2, 1, 0xA2, 0x29])  # A's address and port, as the core takes them
SRC_B = bytes([192, 0, 2, 2, 0xA2, 0x29])


class Pair:
    """Two devices that know each other, after a handshake A initiated and its keepalive."""

    def __init__(self) -> None:
        self.a, self.b = Device(keys.generate_private()), Device(keys.generate_private())
        self.pa = self.a.add_peer(self.b.identity.public)
        self.pb = self.b.add_peer(self.a.identity.public)
        r = self.b.receive(self.pa.begin_handshake(0.0, 1.8e9), SRC_A, 0.0)
        assert r.reply is not None and self.a.receive(r.reply, SRC_B, 0.0).keypair
        keepalive = self.pa.keepalive(0.0)
        assert keepalive is not None and self.b.receive(keepalive, SRC_A, 0.0).payload == b""


def sealed_pair() -> tuple[Pair, bytes]:
    """A pair and one message from A to B under their session."""
    p = Pair()
    data = p.pa.encrypt(pad(PACKET), 1.0)
    assert data is not None
    return p, data


def test_a_flipped_bit_fails_authentication_and_the_original_still_opens():
    p, data = sealed_pair()
    for bit in (-1, 0, 8 * (len(data) - 16) - 1):
        bad = WgMember.flipped(data, bit)
        assert sum(bin(a ^ b).count("1") for a, b in zip(bad, data, strict=True)) == 1
        assert bad[:16] == data[:16]  # the header: same session, same counter
        with pytest.raises(Rejected):
            p.b.receive(bad, SRC_A, 1.0)
    assert _ip_cut(p.b.receive(data, SRC_A, 1.0).payload) == PACKET
    with pytest.raises(ValueError):
        WgMember.flipped(data, -2 + len(data) * 8)


def test_a_message_under_an_unagreed_key_is_well_formed_and_opens_nowhere():
    p, _ = sealed_pair()
    [index] = p.b.indices & p.pb.local_indices()
    data = WgMember.unagreed(PACKET, receiver=index, counter=7)
    msg = Transport.decode(data)
    assert (msg.receiver, msg.counter) == (index, 7)
    with pytest.raises(Rejected):
        p.b.receive(data, SRC_A, 1.0)


def test_ip_cut_drops_the_transport_padding_only():
    v6 = bytes(IPv6(src="fd7a:115c:a1e0::1", dst="fd7a:115c:a1e0::2") / UDP() / b"x")
    for packet in (PACKET, v6):
        assert _ip_cut(pad(packet)) == packet


def test_parse_udp_reads_addresses_ports_and_payload_of_both_families():
    v4 = bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=41641, dport=41641)
               / b"\x04\0\0\0data")
    u = parse_udp(v4 + bytes(6), outgoing=True)  # Ethernet padding is not payload
    assert u is not None
    assert (u.src, u.dst, u.payload, u.outgoing) == (
        ("192.0.2.1", 41641), ("192.0.2.2", 41641), b"\x04\0\0\0data", True)
    v6 = bytes(Ether() / IPv6(src="2001:db8:1::2", dst="2001:db8:2::2") / UDP(sport=5, dport=6)
               / b"six")
    u = parse_udp(v6)
    assert u is not None and (u.src, u.dst, u.payload) == (
        ("2001:db8:1::2", 5), ("2001:db8:2::2", 6), b"six")
    tcp = bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2", proto=6) / (b"\0" * 20))
    assert parse_udp(tcp) is None
    assert parse_udp(b"\0" * 10) is None
