"""Micro-benchmark of the datapath's per-packet code on one core, in memory.

Every figure is a C-level loop with the GIL released (conn25._fastpath.bench_loop):
copy a packet into a buffer, then run one stage on it. The baseline is the copy
alone, measured in the same run; the table shows ns per packet, packets per
second, and the ratio to that baseline. "python call" is the same TUN-side
decision made through Datapath.process_from_tun once per packet from Python,
to show what staying out of the interpreter buys. The seal/open rows are WireGuard's
per-packet encryption alone (the _test_bench_aead probe, also a C loop).

The WireGuard rows show what encryption costs per packet: "seal" is the send
side's whole transport step (counter, padding, ChaCha20-Poly1305 through
OpenSSL, header); the connector's datagram-in row runs seal then receive
(index, replay window, decryption, source check, flow hit, DNAT) on one node
that holds a loopback session (same index and key both ways), and its
"open + decide" row is that minus the seal row. The datagrams' length is the
packet's rounded up to 16, plus 32.

    python bench/fastpath.py [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import ipaddress
import platform
import time

from scapy.layers.inet import IP, TCP

from conn25._fastpath import _test_bench_aead, bench_loop
from conn25.core.iprange import IPRange
from conn25.fastpath import Datapath, monotonic_ms

CLIENT, CONNECTOR = "100.64.0.1", "100.64.0.2"
CLIENT_PEER = 1
CLIENT_EP, CONNECTOR_EP = ("192.0.2.1", 41641), ("192.0.2.2", 41641)
MAGIC, TRANSIT, REAL = "100.80.0.5", "169.254.128.5", "203.0.113.10"


def ip(a: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(a)


def nodes() -> tuple[Datapath, Datapath]:
    client = Datapath(client=True)
    client.tables.set_local([ip(CLIENT)])
    client.tables.set_peer(2, ip(CONNECTOR_EP[0]), CONNECTOR_EP[1], [ip(CONNECTOR)])
    client.tables.set_magic_ranges([IPRange.parse("100.80.0.0/16")])
    client.tables.set_magic(ip(MAGIC), ip(TRANSIT))
    client.tables.set_route(ip(TRANSIT), 2)
    connector = Datapath(client=False, connector=True)
    connector.tables.set_local([ip(CONNECTOR)])
    connector.tables.set_peer(1, ip(CLIENT_EP[0]), CLIENT_EP[1], [ip(CLIENT)])
    connector.tables.set_transit_ranges([IPRange.parse("169.254.128.0/17")])
    connector.tables.set_transit(CLIENT_PEER, ip(TRANSIT), ip(REAL), 1)
    # A loopback session with the client (bench_loop "overlay": the node receives what it
    # sealed). Keys are fixed: the cost does not depend on them.
    key = bytes(range(32))
    connector.install_keypair(CLIENT_PEER, local_index=7, remote_index=7, send_key=key,
                              receive_key=key, initiator=False, created_ms=monotonic_ms(),
                              as_next=False)
    return client, connector


def per_packet_ns(fn, seconds: float) -> float:
    """ns per packet of fn(iterations) -> total ns, scaled to run about `seconds`."""
    n = 1000
    while True:
        ns = fn(n)
        if ns >= seconds * 1e9 / 4 or n >= 1 << 28:
            break
        n *= 4
    n = max(n, int(n * seconds * 1e9 / max(ns, 1)))
    return min(fn(n) / n for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per figure (default 0.5)")
    args = ap.parse_args()
    client, connector = nodes()
    rows = []
    for size in (64, 1400):
        pad = b"x" * max(0, size - 40)
        syn = bytes(IP(src=CLIENT, dst=MAGIC) / TCP(sport=40000, dport=443, flags="A") / pad)
        to_transit = bytes(IP(src=CLIENT, dst=TRANSIT) / TCP(sport=40000, dport=443) / pad)
        ret = bytes(IP(src=REAL, dst=CLIENT) / TCP(sport=443, dport=40000) / pad)
        # Establish the flows once, so the loops measure the steady state.
        now = monotonic_ms()
        client.process_from_tun(syn, now)
        sealed, _ = connector.seal(CLIENT_PEER, to_transit, now)
        assert connector.process_datagram(sealed, CLIENT_EP, now)[0] == "tun"

        def loop(dp, pkt, what, peer=None):
            return lambda n: bench_loop(dp, pkt, n, what, peer)

        def python_calls(n, pkt=syn, now=now):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                client.process_from_tun(pkt, now)
            return time.perf_counter_ns() - t0

        base = per_packet_ns(loop(client, syn, "copy"), args.seconds)
        seal = per_packet_ns(loop(connector, to_transit, "seal", CLIENT_PEER), args.seconds)
        overlay = per_packet_ns(loop(connector, to_transit, "overlay", CLIENT_PEER),
                                args.seconds)
        cases = [
            ("copy (baseline)", base),
            ("parse", per_packet_ns(loop(client, syn, "parse"), args.seconds)),
            ("client: app -> magic (flow hit, DNAT)",
             per_packet_ns(loop(client, syn, "tun"), args.seconds)),
            ("seal (counter, pad, ChaCha20-Poly1305, header)", seal),
            ("connector: seal + datagram in (open, checks, flow hit, DNAT)", overlay),
            ("overlay (open + decide): the row above minus seal", max(overlay - seal, 1.0)),
            ("connector: return from TUN (flow hit, SNAT)",
             per_packet_ns(loop(connector, ret, "tun"), args.seconds)),
            ("python call per packet (client, same work)",
             per_packet_ns(python_calls, args.seconds / 4)),
            # WireGuard's transport encryption of the same payload size (aead.pxd), which
            # every packet will pay on top of the stages above.
            ("seal (ChaCha20-Poly1305, OpenSSL)",
             per_packet_ns(lambda n, size=size: _test_bench_aead(size, n), args.seconds)),
            ("open (ChaCha20-Poly1305, OpenSSL, copy included)",
             per_packet_ns(lambda n, size=size: _test_bench_aead(size, n, True),
                           args.seconds)),
        ]
        for name, ns in cases:
            rows.append((size, name, ns, 1e9 / ns / 1e6, ns / base))
    print(f"# fastpath micro-benchmark — {platform.processor() or platform.machine()}, "
          f"{platform.python_implementation()} {platform.python_version()}, one core\n")
    print("| size | stage | ns/packet | Mpps | x baseline |")
    print("|---:|---|---:|---:|---:|")
    for size, name, ns, mpps, ratio in rows:
        print(f"| {size} | {name} | {ns:.0f} | {mpps:.2f} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
