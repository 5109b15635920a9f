"""The calls the daemon makes into the compiled datapath, for the type checker.

Never run: test_typing.py has mypy --strict check this file against
conn25/_fastpath.pyi, so a change to the extension's surface that breaks
the daemon's way of calling it fails there, without root or a TUN device.
"""

from __future__ import annotations

import ipaddress
import socket

from conn25.core.iprange import IPAddress, IPRange
from conn25.fastpath import Datapath, EventKind, Role, monotonic_ms


def install(dp: Datapath, own: list[IPAddress], peer_id: int, host: str, port: int,
            overlay: list[IPAddress], magic_ranges: list[IPRange],
            transit_ranges: set[IPRange]) -> None:
    tables = dp.tables
    tables.set_local(own)
    tables.set_peer(peer_id, ipaddress.ip_address(host), port, overlay)
    tables.set_magic_ranges(magic_ranges)
    tables.set_transit_ranges(sorted(transit_ranges))


def assign(dp: Datapath, magic: IPAddress, transit: IPAddress, connector: int) -> None:
    dp.tables.set_route(transit, connector)
    dp.tables.set_magic(magic, transit)


def reclaim(dp: Datapath, magic: IPAddress, transit: IPAddress) -> bool:
    return dp.tables.del_magic(magic) and dp.tables.del_route(transit)


def map_transit(dp: Datapath, peer: int, transit: IPAddress, real: IPAddress,
                app: int, registered: float, tag: int) -> bool:
    return dp.tables.set_transit(peer, transit, real, app, registered, tag)


def read_mappings(dp: Datapath, peer: int, transit: IPAddress,
                  before: float) -> list[tuple[bytes, bytes, float, int]]:
    """What dataplane.ConnectorStore reads back of the connector's mappings."""
    out: list[tuple[bytes, bytes, float, int]] = []
    entry = dp.tables.transit_entry(peer, transit)
    if entry is not None:
        real, _, registered, tag = entry
        out.append((transit.packed, real, registered, tag))
    for _, t, r, _, when, tag in dp.tables.transit_entries(before, 1000):
        out.append((t, r, when, tag))
    start = 0
    while start >= 0:
        rows, start = dp.tables.transit_chunk(start, 1024)
        out.extend((t, r, when, tag) for _, t, r, _, when, tag in rows)
    return out


def unmap(dp: Datapath, peer_id: int, transit: IPAddress) -> None:
    dp.tables.del_transit(peer_id, transit)
    dp.tables.del_peer(peer_id)


def run(tun_fd: int, sock: socket.socket, saved: bytes) -> tuple[int, bytes]:
    dp = Datapath(client=True, connector=True)
    restored = dp.restore_flows(saved, monotonic_ms())
    dp.start(tun_fd, sock)
    try:
        dp.sweep(monotonic_ms(), 1000)
        drops: int = dp.counters()["drop_spoofed"]
        fd: int = dp.event_fd
        assert fd >= 0 and drops >= 0
    finally:
        dp.stop()
    return restored, dp.save_flows()


def session(dp: Datapath, peer_id: int, keys: tuple[bytes, bytes], now: int) -> list[str]:
    """What the WireGuard driver (daemon/overlay.py) calls."""
    dp.set_endpoint(peer_id, ("192.0.2.1", 41641), now)
    dp.install_keypair(peer_id, local_index=1, remote_index=2, send_key=keys[0],
                       receive_key=keys[1], initiator=True, created_ms=now, as_next=False)
    out = []
    for packet in dp.take_staged(peer_id):
        sealed = dp.seal(peer_id, packet, now)
        if sealed is not None:
            datagram, (host, port) = sealed
            out.append(f"{len(datagram)} bytes to {host}:{port}")
    messages, waiting = dp.read_handshakes()
    out.extend(f"{len(m)} bytes from {sender[0]}:{sender[1]} ({waiting} waiting)"
               for m, sender in messages if sender is not None)
    state = dp.peer_state(peer_id)
    if state is not None:
        out.append(f"endpoint {state['endpoint']}")
    endpoint = dp.tables.lookup_peer(peer_id)
    if endpoint is not None and endpoint[0] is None:
        out.append("no endpoint yet")
    dp.tables.set_peer(peer_id, None, 0, [])
    return out


def read_events(dp: Datapath) -> list[str]:
    out = []
    for ev in dp.read_events():
        if ev.kind is EventKind.HANDSHAKE_WANTED:  # session events name no transit IP
            out.append(f"handshake with peer {ev.peer}")
            continue
        transit = ipaddress.ip_address(ev.transit)
        if ev.kind is EventKind.FLOW_CREATED and ev.role is Role.CLIENT:
            out.append(f"started {transit}")
        elif ev.kind is EventKind.FLOW_REMOVED and ev.role is Role.CLIENT:
            out.append(f"ended {transit} ({ev.reason})")
        elif ev.kind is EventKind.REJECT:
            out.append(f"rejected {transit} by peer {ev.peer}")
        elif ev.kind is EventKind.UNMAPPED_TRANSIT:
            out.append(f"refused {transit} of peer {ev.peer}")
    return out
