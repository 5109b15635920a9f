"""The pump threads without root: a unix datagram socketpair stands in for the TUN
device (it keeps packet boundaries, as a TUN fd does) and the overlay runs on
loopback UDP sockets. Checks the pumps' I/O, the event fd as trio waits on it,
rejects, and table changes while packets flow.
"""

import socket
import threading

import pytest
import trio
from pumpnet import ip, recv
from scapy.layers.inet import IP, TCP

import wgsessions
from conn25.core.iprange import IPRange
from conn25.fastpath import Datapath, EventKind, monotonic_ms

CLIENT, CONNECTOR = "100.64.0.1", "100.64.0.2"
MAGIC, T1, T2 = "100.80.0.5", "169.254.128.5", "169.254.128.6"




@pytest.fixture
def rig():
    app, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    overlay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    overlay.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # plays the connector
    peer.bind(("127.0.0.1", 0))
    dp = Datapath(client=True)
    dp.tables.set_local([ip(CLIENT)])
    dp.tables.set_peer(2, ip("127.0.0.1"), peer.getsockname()[1], [ip(CONNECTOR)])
    dp.tables.set_magic_ranges([IPRange.parse("100.80.0.0/16")])
    dp.tables.set_magic(ip(MAGIC), ip(T1))
    dp.tables.set_route(ip(T1), 2)
    dp.tables.set_route(ip(T2), 2)
    remote = wgsessions.connect(dp, 2, monotonic_ms())
    dp.start(tun.fileno(), overlay)
    try:
        yield dp, app, overlay, peer, remote
    finally:
        dp.stop()
        for s in (app, tun, overlay, peer):
            s.close()


def syn(sport=40000):
    return bytes(IP(src=CLIENT, dst=MAGIC) / TCP(sport=sport, dport=443, flags="S"))


def test_packets_flow_both_ways_and_events_wake_trio(rig):
    dp, app, overlay, peer, remote = rig
    app.send(syn())
    dg = recv(peer)
    out = IP(remote.open(dg))
    assert (out.dst, out[TCP].dport) == (T1, 443)

    reply = IP(src=T1, dst=CLIENT) / TCP(sport=443, dport=40000, flags="SA")
    peer.sendto(remote.seal(bytes(reply)), overlay.getsockname())
    back = IP(recv(app))
    assert (back.src, back.dst) == (MAGIC, CLIENT)

    async def wait_for_events():
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(dp.event_fd)
        return dp.read_events()

    events = trio.run(wait_for_events)
    assert [(e.kind, e.transit) for e in events] == [(EventKind.FLOW_CREATED, ip(T1).packed)]

    # A reject from the connector becomes an event too.
    reject = IP(src=CONNECTOR, dst=CLIENT, proto=253) / (b"\x04" + ip(T1).packed)
    peer.sendto(remote.seal(bytes(reject)), overlay.getsockname())
    events = trio.run(wait_for_events)
    assert [(e.kind, e.transit, e.peer) for e in events] == [(EventKind.REJECT, ip(T1).packed, 2)]
    c = dp.counters()
    assert c["tun_rx"] == 1 and c["udp_tx"] == 1 and c["tun_tx"] == 1 and c["udp_rx"] == 2


def test_unassigned_magic_gets_an_icmp_error_through_the_tun(rig):
    dp, app, _, _, _ = rig
    app.send(bytes(IP(src=CLIENT, dst="100.80.0.99") / TCP(sport=1, dport=443, flags="S")))
    err = IP(recv(app))
    assert (err.src, err.dst, err.proto) == ("100.80.0.99", CLIENT, 1)
    assert dp.counters()["unmapped_magic"] == 1


def test_mapping_changes_while_packets_flow_never_tear(rig):
    """Table updates from the control plane during traffic: every packet goes to
    exactly one of the two transit IPs, with a valid checksum."""
    dp, app, _, peer, remote = rig
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            dp.tables.set_magic(ip(MAGIC), ip(T2 if i % 2 else T1))
            i += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    seen = set()
    try:
        for sport in range(20000, 20300):  # a new flow per packet: each consults the table
            app.send(syn(sport))
            pkt = IP(remote.open(recv(peer)))
            assert pkt.dst in (T1, T2)
            assert pkt[TCP].sport == sport
            sent_sum = pkt[TCP].chksum
            del pkt[TCP].chksum
            assert IP(bytes(pkt))[TCP].chksum == sent_sum
            seen.add(pkt.dst)
    finally:
        stop.set()
        flipper.join()
    assert seen == {T1, T2}
