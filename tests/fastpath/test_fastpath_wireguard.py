"""WireGuard transport in the datapath, checked against the pure-Python reference.

The datapath seals and opens transport data messages itself (session.pxd,
wire.pxd); conn25.core.wireguard.transport is an independent implementation
of the same messages. Here each test plays the peer with the reference
(tests/wgsessions.py) and pins: byte-for-byte equal datagrams, opening,
the replay window, authentication, index and age checks, cryptokey routing,
rotation of a responder's keypair, rekey and handshake requests, staging,
roaming, the handshake queue, and the connector's reject inside the tunnel.
"""

import ipaddress
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pumpnet import ip, recv
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

import wgsessions
from conn25.core.iprange import IPRange
from conn25.core.wireguard import transport
from conn25.core.wireguard.messages import Transport
from conn25.fastpath import Datapath, EventKind, Role, monotonic_ms
from conn25.lab.netns import wait_for

NOW = 10_000_000
PEER = 7
US, US6 = "100.64.0.2", "fd7a:115c:a1e0::2"          # the datapath's node
THEM, THEM6 = "100.64.0.1", "fd7a:115c:a1e0::1"      # the peer the test plays
EP = ("192.0.2.1", 41641)
REKEY_AFTER_MS, REJECT_AFTER_MS = 120_000, 180_000    # WireGuard's REKEY/REJECT_AFTER_TIME
REKEY_ON_RECEIVE_MS = 165_000                        # REJECT_AFTER - KEEPALIVE - REKEY_TIMEOUT
STAGED_MAX, STAGED_BYTES, HANDSHAKE_QUEUE = 128, 1 << 20, 1024


def node(endpoint=EP, connector=False) -> Datapath:
    dp = Datapath(client=not connector, connector=connector)
    dp.tables.set_local([ip(US), ip(US6)])
    dp.tables.set_peer(PEER, ip(endpoint[0]) if endpoint else None,
                       endpoint[1] if endpoint else 0, [ip(THEM), ip(THEM6)])
    return dp


def to_us(size=8, src=THEM, dst=US, sport=5000):
    """A UDP packet from the peer to this node, `size` payload bytes."""
    layer = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return bytes(layer / UDP(sport=sport, dport=53) / (b"q" * size))


def from_us(total: int, v6: bool) -> bytes:
    """An IP packet of exactly `total` bytes from this node to the peer (no L4 header:
    sealing does not parse it)."""
    if v6:
        hdr = IPv6(src=US6, dst=THEM6, nh=59)
        return bytes(hdr / Raw(bytes(i % 251 for i in range(total - 40))))
    return bytes(IP(src=US, dst=THEM, proto=59) / Raw(bytes(i % 251 for i in range(total - 20))))


def kinds(dp):
    return [(e.kind, e.peer) for e in dp.read_events()]


# -- sealing and opening: the reference agrees byte for byte -------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_sealed_datagram_is_the_reference_seal_of_the_padded_packet(v6):
    """Every length from a keepalive (0) and the bare header to 1500 bytes: the same
    datagram as transport.seal under the same keypair, with counters 0, 1, 2, ...;
    the bytes counted are those on the wire."""
    dp = node()
    ours, theirs = wgsessions.pair()
    wgsessions.install(dp, PEER, ours, NOW)
    remote = wgsessions.Remote(theirs)
    lengths = [0, *range(40 if v6 else 20, 1501)]
    wire = 0
    for counter, n in enumerate(lengths):
        packet = from_us(n, v6) if n else b""
        dg, endpoint = dp.seal(PEER, packet, NOW)
        assert dg == transport.seal(ours, counter, transport.pad(packet)), n
        assert len(dg) == 32 + -(-n // 16) * 16 and endpoint == EP
        assert remote.open(dg) == packet
        wire += len(dg)
    state = dp.peer_state(PEER)
    assert state["sessions"]["current"]["sent"] == len(lengths)
    assert (state["tx_bytes"], state["last_tx_ms"]) == (wire, NOW)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_the_datapath_opens_what_the_reference_sealed(v6):
    """Padding trimmed by the IP length, delivered as sent; rx bytes are the wire's."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    wire = 0
    for size in range(0, 1473, 7):
        pkt = to_us(size, *((THEM6, US6) if v6 else (THEM, US)))
        dg = remote.seal(pkt)
        assert dp.process_datagram(dg, EP, NOW) == ("tun", pkt, None), size
        wire += len(dg)
    state = dp.peer_state(PEER)
    assert (state["rx_bytes"], state["last_rx_ms"]) == (wire, NOW)
    assert set(state["drops"].values()) == {0}


def test_a_keepalive_is_counted_and_goes_nowhere():
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    assert dp.process_datagram(remote.seal(b""), EP, NOW) == ("drop", b"", None)
    c = dp.counters()
    assert (c["keepalives_received"], c["tun_tx"], c["drop_malformed"]) == (1, 0, 0)
    assert dp.peer_state(PEER)["last_rx_ms"] == NOW


def test_padding_that_is_no_ip_packet_is_malformed():
    """A plaintext whose IP header claims more than was sealed is dropped."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    pkt = bytearray(to_us(40))
    pkt[2:4] = (len(pkt) + 64).to_bytes(2, "big")
    assert dp.process_datagram(remote.seal(bytes(pkt)), EP, NOW)[0] == "drop"
    assert dp.counters()["drop_malformed"] == 1


# -- the replay window ---------------------------------------------------------------------------


def test_a_replayed_datagram_is_dropped():
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    dg = remote.seal(to_us())
    assert dp.process_datagram(dg, EP, NOW)[0] == "tun"
    assert dp.process_datagram(dg, EP, NOW)[0] == "drop"
    assert dp.counters()["drop_replay"] == 1
    assert dp.peer_state(PEER)["drops"]["replay"] == 1


def test_the_window_wraps_without_remembering_old_counters():
    """Counters a whole ring (8192) apart share a word of the window: moving to a new
    word must forget the old one's bits. 8192 arrives after 8193, within the window,
    and is new; it shares its bit with counter 0, seen long ago."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    for counter in (0, 8191, 8193, 8192):
        assert dp.process_datagram(remote.seal(to_us(), counter), EP, NOW)[0] == "tun", counter
    assert dp.counters()["drop_replay"] == 0


COUNTERS = st.lists(
    st.one_of(st.integers(0, 300), st.integers(8000, 8400), st.integers(16250, 16500),
              st.integers(0, 2**64 - 1)),
    min_size=1, max_size=24)


@settings(max_examples=150, deadline=None)
@given(COUNTERS)
def test_the_window_accepts_what_the_reference_window_accepts(counters):
    """Any order of counters, near word and ring boundaries and far apart: each is
    delivered exactly when transport.ReplayWindow accepts it."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    window = transport.ReplayWindow()
    for counter in counters:
        if counter >= transport.REJECT_AFTER_MESSAGES:
            # The reference cannot seal those (nonce of a finished session): forge one
            # from a genuine datagram; it must not authenticate nor pass the window.
            dg = remote.seal(to_us(), 0)
            dg = dg[:8] + counter.to_bytes(8, "little") + dg[16:]
        else:
            dg = remote.seal(to_us(), counter)
        delivered = dp.process_datagram(dg, EP, NOW)[0] == "tun"
        assert delivered == window.accept(counter), (counter, counters)


# -- authentication, index, age, cryptokey routing -----------------------------------------------


def test_a_flipped_bit_anywhere_is_dropped_and_moves_nothing():
    """Counter, ciphertext or tag: not authentic (drop_auth); index: no session of ours;
    type or reserved bytes: no WireGuard message. The genuine datagram still opens
    afterwards: a forgery marks no counter and teaches no endpoint."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    pkt = to_us(20)
    dg = remote.seal(pkt)
    expect = {"drop_auth": 0, "drop_unknown_index": 0, "drop_bad_header": 0}
    for pos in range(len(dg)):
        bad = bytearray(dg)
        bad[pos] ^= 1 << (pos % 8)
        assert dp.process_datagram(bytes(bad), ("198.51.100.9", 1), NOW)[0] == "drop", pos
        expect["drop_bad_header" if pos < 4 else
               "drop_unknown_index" if pos < 8 else "drop_auth"] += 1
    c = dp.counters()
    assert {k: c[k] for k in expect} == expect
    state = dp.peer_state(PEER)
    assert state["drops"]["auth"] == len(dg) - 8 and state["endpoint"] == EP
    assert state["last_rx_ms"] == 0
    assert dp.process_datagram(dg, EP, NOW) == ("tun", pkt, None)


def test_an_unknown_receiver_index_is_dropped():
    dp = node()
    wgsessions.connect(dp, PEER, NOW)
    _, other = wgsessions.pair(local_index=0x77, remote_index=0x78)
    assert dp.process_datagram(wgsessions.Remote(other).seal(to_us()), EP, NOW)[0] == "drop"
    assert dp.counters()["drop_unknown_index"] == 1
    assert set(dp.peer_state(PEER)["drops"].values()) == {0}


def test_a_keypair_older_than_reject_after_time_is_refused_both_ways():
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    last = NOW + REJECT_AFTER_MS - 1
    assert dp.process_datagram(remote.seal(to_us()), EP, last)[0] == "tun"
    assert dp.seal(PEER, to_us(src=US, dst=THEM), last) is not None
    dp.read_events()
    assert dp.process_datagram(remote.seal(to_us()), EP, last + 1)[0] == "drop"
    assert dp.seal(PEER, to_us(src=US, dst=THEM), last + 1) is None  # staged instead
    c = dp.counters()
    assert (c["drop_expired"], c["staged"]) == (1, 1)
    state = dp.peer_state(PEER)
    assert (state["drops"]["expired"], state["staged"]) == (1, 1)
    assert kinds(dp) == [(EventKind.HANDSHAKE_WANTED, PEER)]


def test_a_valid_key_with_a_spoofed_inner_source_is_dropped():
    """Cryptokey routing: authentic, but the source is not one of the peer's addresses."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    dp.tables.set_peer(8, None, 0, [ip("100.64.0.8")])
    for src, dst in (("100.64.0.8", US), ("198.51.100.1", US), (US, US), (THEM6, US6)):
        verdict = dp.process_datagram(remote.seal(to_us(src=src, dst=dst)), EP, NOW)[0]
        assert verdict == ("tun" if src == THEM6 else "drop"), src
    assert dp.counters()["drop_spoofed"] == 3
    assert dp.peer_state(PEER)["drops"]["spoofed"] == 3
    assert dp.peer_state(8)["drops"]["spoofed"] == 0


# -- rotation, rekey, staging --------------------------------------------------------------------


def test_a_responders_next_keypair_is_confirmed_by_its_first_datagram():
    """Installed as next, it is not used to send until the initiator used it; then
    it is current, the old current previous (still accepted), with an event."""
    dp = node()
    old = wgsessions.connect(dp, PEER, NOW, initiator=False)
    new = wgsessions.connect(dp, PEER, NOW + 5, initiator=False, as_next=True,
                             local_index=0x99, remote_index=0x98, key_out=bytes(range(50, 82)))
    state = dp.peer_state(PEER)["sessions"]
    assert (state["current"]["local_index"], state["next"]["local_index"]) == (
        wgsessions.LOCAL_INDEX, 0x99)
    dg, _ = dp.seal(PEER, b"", NOW + 6)
    assert Transport.decode(dg).receiver == wgsessions.REMOTE_INDEX  # still the old session
    assert kinds(dp) == []
    assert dp.process_datagram(new.seal(to_us()), EP, NOW + 7)[0] == "tun"
    assert kinds(dp) == [(EventKind.SESSION_CONFIRMED, PEER)]
    state = dp.peer_state(PEER)["sessions"]
    assert set(state) == {"current", "previous"}
    assert (state["current"]["local_index"], state["previous"]["local_index"]) == (
        0x99, wgsessions.LOCAL_INDEX)
    dg, _ = dp.seal(PEER, b"", NOW + 8)
    assert Transport.decode(dg).receiver == 0x98 and new.open(dg) == b""
    assert dp.process_datagram(old.seal(to_us()), EP, NOW + 9)[0] == "tun"  # previous
    assert kinds(dp) == []  # confirmed once


def test_crossing_handshakes_keep_the_answered_keypair_for_the_peers_datagrams():
    """We answered the peer's handshake (next), then our own completed (current): the peer
    sends under the one we answered, so that one stays, as previous, and the old current
    goes, as in wireguard-go and the kernel's module."""
    dp = node()
    old = wgsessions.connect(dp, PEER, NOW)
    answered = wgsessions.connect(dp, PEER, NOW + 5, initiator=False, as_next=True,
                                  local_index=0x99, remote_index=0x98,
                                  key_out=bytes(range(50, 82)))
    ours = wgsessions.connect(dp, PEER, NOW + 6, local_index=0x77, remote_index=0x76,
                              key_out=bytes(range(150, 182)), key_in=bytes(range(200, 232)))
    state = dp.peer_state(PEER)["sessions"]
    assert set(state) == {"current", "previous"}
    assert (state["current"]["local_index"], state["previous"]["local_index"]) == (0x77, 0x99)
    assert dp.process_datagram(answered.seal(to_us()), EP, NOW + 7)[0] == "tun"
    assert dp.process_datagram(ours.seal(to_us()), EP, NOW + 7)[0] == "tun"
    assert dp.process_datagram(old.seal(to_us()), EP, NOW + 7)[0] == "drop"
    dg, _ = dp.seal(PEER, b"", NOW + 8)
    assert Transport.decode(dg).receiver == 0x76 and ours.open(dg) == b""


def test_an_initiators_keypair_due_for_rekey_asks_for_a_handshake_once():
    dp = node()
    wgsessions.connect(dp, PEER, NOW)
    assert dp.seal(PEER, b"", NOW + REKEY_AFTER_MS - 1) is not None
    assert kinds(dp) == []
    for t in range(3):  # still sent: the handshake is asked for while the keypair works
        assert dp.seal(PEER, b"", NOW + REKEY_AFTER_MS + t) is not None
    assert kinds(dp) == [(EventKind.HANDSHAKE_WANTED, PEER)]
    assert dp.seal(PEER, b"", NOW + REKEY_AFTER_MS + 10) is not None
    assert kinds(dp) == []


def test_an_initiators_old_keypair_asks_for_a_rekey_when_receiving():
    """A peer that only receives rekeys before its keypair expires, once."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    assert dp.process_datagram(remote.seal(to_us()), EP, NOW + REKEY_ON_RECEIVE_MS - 1)[0] == "tun"
    assert kinds(dp) == []
    for t in range(2):
        assert dp.process_datagram(remote.seal(to_us()), EP,
                                   NOW + REKEY_ON_RECEIVE_MS + t)[0] == "tun"
    assert kinds(dp) == [(EventKind.HANDSHAKE_WANTED, PEER)]


def test_threads_sealing_for_one_peer_never_share_a_counter():
    """seal() from several threads at once: every datagram has its own counter
    (reserved under the tables' lock) and opens (the control plane's one cipher
    context is never used by two threads at once)."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    packet = from_us(200, False)
    out: list[list[bytes]] = [[] for _ in range(8)]

    def worker(mine: list[bytes]) -> None:
        for _ in range(1000):
            mine.append(dp.seal(PEER, packet, NOW)[0])

    threads = [threading.Thread(target=worker, args=(o,)) for o in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [dg for o in out for dg in o]
    assert sorted(wgsessions.Remote.counter(dg) for dg in sent) == list(range(len(sent)))
    assert all(remote.open(dg) == packet for dg in sent)


def test_a_responders_keypair_does_not_ask_for_a_rekey_when_sending():
    """Only the initiator rekeys by age on send (the other side would race it)."""
    dp = node()
    wgsessions.connect(dp, PEER, NOW, initiator=False)
    assert dp.seal(PEER, b"", NOW + REKEY_AFTER_MS + 1) is not None
    assert kinds(dp) == []


def test_packets_without_a_session_are_staged_boundedly_in_order():
    dp = node()
    packets = [to_us(src=US, dst=THEM, sport=i) for i in range(STAGED_MAX + 2)]
    for pkt in packets:
        assert dp.seal(PEER, pkt, NOW) is None
    # one request until the control plane took it
    assert kinds(dp) == [(EventKind.HANDSHAKE_WANTED, PEER)]
    state = dp.peer_state(PEER)
    assert (state["staged"], state["drops"]["staged_overflow"]) == (STAGED_MAX, 2)
    assert dp.counters()["staged"] == STAGED_MAX + 2
    assert dp.take_staged(PEER) == packets[2:]
    assert dp.take_staged(PEER) == [] and dp.peer_state(PEER)["staged"] == 0
    assert dp.seal(PEER, b"", NOW) is None  # a keepalive is not staged
    assert dp.peer_state(PEER)["staged"] == 0
    assert kinds(dp) == [(EventKind.HANDSHAKE_WANTED, PEER)]  # asked again after the take
    # once the session is there, what was staged goes out sealed, in order
    for pkt in packets[:3]:
        dp.seal(PEER, pkt, NOW)
    remote = wgsessions.connect(dp, PEER, NOW)
    sent = [dp.seal(PEER, pkt, NOW)[0] for pkt in dp.take_staged(PEER)]
    assert [remote.open(dg) for dg in sent] == packets[:3]


def test_staged_packets_are_bounded_in_bytes_too():
    """Large packets: the oldest go once a megabyte waits, before 128 do."""
    dp = node()
    big = [from_us(9000, False)[:-1] + bytes([i]) for i in range(STAGED_MAX)]
    for pkt in big:
        dp.seal(PEER, pkt, NOW)
    kept = STAGED_BYTES // 9000
    state = dp.peer_state(PEER)
    assert (state["staged"], state["drops"]["staged_overflow"]) == (kept, STAGED_MAX - kept)
    assert dp.take_staged(PEER) == big[-kept:]


# -- endpoints and roaming -----------------------------------------------------------------------


@pytest.mark.parametrize("session", [False, True], ids=["no-session", "session"])
def test_a_peer_without_an_endpoint_gets_nothing(session):
    """Until it made contact there is nowhere to send: dropped and counted, not staged
    (a handshake could not be sent either), with or without a keypair."""
    dp = node(endpoint=None)
    if session:
        wgsessions.connect(dp, PEER, NOW)
    assert dp.seal(PEER, to_us(src=US, dst=THEM), NOW) is None
    assert dp.counters()["drop_no_endpoint"] == 1
    state = dp.peer_state(PEER)
    assert (state["drops"]["no_endpoint"], state["staged"], state["endpoint"]) == (1, 0, None)
    assert kinds(dp) == []


def test_roaming_follows_the_latest_authenticated_datagram():
    """A datagram from a new address and port moves the endpoint; seal() sends there.
    A replayed or forged one from elsewhere does not."""
    dp = node(endpoint=None)
    remote = wgsessions.connect(dp, PEER, NOW)
    first = remote.seal(to_us())
    assert dp.process_datagram(first, ("192.0.2.50", 4000), NOW + 1)[0] == "tun"
    state = dp.peer_state(PEER)
    assert (state["endpoint"], state["endpoint_learned_ms"]) == (("192.0.2.50", 4000), NOW + 1)
    assert dp.seal(PEER, b"", NOW + 2)[1] == ("192.0.2.50", 4000)
    assert dp.process_datagram(remote.seal(to_us()), ("2001:db8::7", 5000), NOW + 3)[0] == "tun"
    assert dp.seal(PEER, b"", NOW + 4)[1] == ("2001:db8::7", 5000)
    assert dp.process_datagram(first, ("198.51.100.66", 1), NOW + 5)[0] == "drop"  # replay
    forged = bytearray(remote.seal(to_us()))
    forged[-1] ^= 1
    assert dp.process_datagram(bytes(forged), ("198.51.100.66", 1), NOW + 6)[0] == "drop"
    state = dp.peer_state(PEER)
    assert (state["endpoint"], state["endpoint_learned_ms"]) == (("2001:db8::7", 5000), NOW + 3)
    # the control plane saw a handshake from elsewhere: that is where datagrams go
    assert dp.set_endpoint(PEER, ("192.0.2.77", 41641), NOW + 7)
    assert dp.seal(PEER, b"", NOW + 8)[1] == ("192.0.2.77", 41641)
    assert not dp.set_endpoint(99, ("192.0.2.77", 41641), NOW + 7)


def test_a_reload_keeps_sessions_and_the_learned_endpoint_until_the_config_moves_it():
    """set_peer again (the tailnet file re-read): the session goes on (its counter too)
    and the roamed endpoint stays; a changed configured endpoint wins; del_peer
    forgets the session, whose datagrams then name no session of ours."""
    dp = node()
    remote = wgsessions.connect(dp, PEER, NOW)
    assert dp.process_datagram(remote.seal(to_us()), ("192.0.2.50", 4000), NOW)[0] == "tun"
    dp.seal(PEER, b"", NOW)
    overlay = [ip(THEM), ip(THEM6)]
    dp.tables.set_peer(PEER, ip(EP[0]), EP[1], overlay)  # the same configuration
    dg, endpoint = dp.seal(PEER, b"", NOW)
    assert (remote.counter(dg), endpoint) == (1, ("192.0.2.50", 4000))
    dp.tables.set_peer(PEER, ip("192.0.2.60"), 41641, overlay)
    assert dp.seal(PEER, b"", NOW)[1] == ("192.0.2.60", 41641)
    assert dp.process_datagram(remote.seal(to_us()), EP, NOW)[0] == "tun"
    assert dp.tables.del_peer(PEER)
    assert dp.process_datagram(remote.seal(to_us()), EP, NOW)[0] == "drop"
    assert dp.counters()["drop_unknown_index"] == 1
    assert dp.tables.stats()["indices"] == 0


# -- handshake messages --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "size"), [(1, 148), (2, 92), (3, 64)])
def test_handshake_messages_of_their_exact_size_are_queued(kind, size):
    dp = node()
    msg = bytes([kind, 0, 0, 0]) + bytes(range(size - 4))
    assert dp.process_datagram(msg, ("192.0.2.9", 1234), NOW) == ("handshake", b"", None)
    for wrong in (size - 1, size + 1):
        bad = bytes([kind, 0, 0, 0]) + bytes(wrong - 4)
        assert dp.process_datagram(bad, ("192.0.2.9", 1234), NOW)[0] == "drop"
    assert dp.read_handshakes() == ([(msg, ("192.0.2.9", 1234))], 1)
    assert dp.read_handshakes() == ([], 0)
    c = dp.counters()
    assert (c["handshakes_received"], c["drop_bad_header"], c["udp_rx"]) == (1, 2, 3)


def test_the_handshake_queue_is_bounded():
    """A flood of initiations keeps the oldest 1024 for the control plane; the rest
    are counted as dropped. After a read there is room again."""
    dp = node()
    msgs = [bytes([1, 0, 0, 0]) + i.to_bytes(4, "little") + bytes(140)
            for i in range(HANDSHAKE_QUEUE + 6)]
    for i, msg in enumerate(msgs):
        dp.process_datagram(msg, ("192.0.2.9", 1000 + i), NOW)
    c = dp.counters()
    assert (c["handshakes_received"], c["handshakes_dropped"]) == (HANDSHAKE_QUEUE, 6)
    queued, waiting = dp.read_handshakes()
    assert waiting == HANDSHAKE_QUEUE
    assert queued == [(m, ("192.0.2.9", 1000 + i)) for i, m in enumerate(msgs[:HANDSHAKE_QUEUE])]
    assert dp.process_datagram(msgs[-1], ("192.0.2.9", 1), NOW)[0] == "handshake"
    assert dp.read_handshakes()[1] == 1


# -- the connector's reject, inside the tunnel ---------------------------------------------------

TRANSIT_RANGES = ["169.254.128.0/17", "fd7a:115c:a1e0:ab13::/64"]


@pytest.mark.parametrize(("src", "dst", "transit"), [
    (THEM, US, "169.254.128.9"), (THEM6, US6, "fd7a:115c:a1e0:ab13::9")], ids=["ipv4", "ipv6"])
def test_the_pumps_reject_an_unmapped_transit_ip_inside_the_tunnel(src, dst, transit):
    """The connector's pumps answer a packet to an unmapped transit IP with a sealed
    IP packet of protocol 253 from its overlay address to the client's, naming the
    transit IP; the client's datapath turns it into a REJECT event. The client is a
    Datapath without pumps holding the other end of the session; the connector's
    TUN is a socketpair (nothing reaches it)."""
    connector = node(connector=True)
    connector.tables.set_transit_ranges([IPRange.parse(r) for r in TRANSIT_RANGES])
    client = Datapath(client=True)
    client.tables.set_local([ip(THEM), ip(THEM6)])
    family = socket.AF_INET if ":" not in src else socket.AF_INET6
    lo = "127.0.0.1" if family == socket.AF_INET else "::1"
    client_sock, overlay = socket.socket(family, socket.SOCK_DGRAM), socket.socket(
        family, socket.SOCK_DGRAM)
    kernel, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        client_sock.bind((lo, 0))
        overlay.bind((lo, 0))
        client.tables.set_peer(2, ip(lo), overlay.getsockname()[1], [ip(US), ip(US6)])
        client.tables.set_route(ip(transit), 2)  # registered with that connector
        now = monotonic_ms()
        theirs, ours = wgsessions.pair()  # the client initiated
        wgsessions.install(client, 2, theirs, now)
        wgsessions.install(connector, PEER, ours, now)
        connector.start(tun.fileno(), overlay)
        syn = to_us(src=src, dst=transit)
        for _ in range(2):  # the second within the gap: no second reject
            dg, endpoint = client.seal(2, syn, now)
            client_sock.sendto(dg, endpoint[:2])
        reply = recv(client_sock)
        inner = transport.unseal(theirs, Transport.decode(reply))
        pkt = (IPv6 if family == socket.AF_INET6 else IP)(inner[:wgsessions.ip_length(inner)])
        addr = ipaddress.ip_address(transit)
        if family == socket.AF_INET:
            assert (pkt.proto, pkt.src, pkt.dst) == (253, US, THEM)
            sent = pkt.chksum
            del pkt.chksum
            assert IP(bytes(pkt)).chksum == sent
        else:
            assert (pkt.nh, pkt.src, pkt.dst, pkt.plen) == (253, US6, THEM6, 17)
        assert bytes(pkt.payload) == bytes([addr.version]) + addr.packed
        verdict, _, _ = client.process_datagram(reply, (lo, overlay.getsockname()[1]), now)
        assert verdict == "drop"
        [ev] = client.read_events()
        assert (ev.kind, ev.role, ev.transit, ev.peer) == (
            EventKind.REJECT, Role.CLIENT, addr.packed, 2)
        # The reply came after the first; the second may still be in the pump.
        wait_for(lambda: connector.counters()["unmapped_transit"] >= 2, 5,
                 "the pump to count the second packet")
        connector.stop()
        c = connector.counters()
        assert (c["unmapped_transit"], c["rejects_sent"], c["tun_tx"]) == (2, 1, 0)
        assert [(e.kind, e.transit, e.peer) for e in connector.read_events()] == [
            (EventKind.UNMAPPED_TRANSIT, addr.packed, PEER)]
    finally:
        connector.stop()
        for s in (client_sock, overlay, kernel, tun):
            s.close()


def test_an_unmapped_transit_ip_gets_the_reject_verdict():
    dp = node(connector=True)
    dp.tables.set_transit_ranges([IPRange.parse(r) for r in TRANSIT_RANGES])
    remote = wgsessions.connect(dp, PEER, NOW)
    pkt = to_us(src=THEM, dst="169.254.128.9")
    assert dp.process_datagram(remote.seal(pkt), EP, NOW) == ("reject", pkt, PEER)
