"""The Python face of the compiled datapath (``conn25._fastpath``).

This module is the whole boundary between the control plane and the
per-packet code; the trio shell uses nothing else from the extension.

One :class:`Datapath` per node::

    dp = Datapath(client=True, connector=False,
                  client_flows=10_000, connector_flows=100_000, idle_timeout_ms=300_000)

Install and remove table entries (addresses packed ``bytes`` or ``ipaddress``
objects; every update is atomic per entry)::

    dp.tables.set_local([own overlay addresses])   # the only untranslated sources and
                                                   # destinations; everything else is dropped
    dp.tables.set_peer(peer_id, endpoint_ip_or_None, port, [overlay addresses])  # also
                                                   # routes them; None: known on contact
    dp.tables.del_peer(peer_id)
    dp.tables.set_route(addr, peer_id) / del_route(addr)      # e.g. a transit IP -> its connector
    dp.tables.set_magic(magic, transit) / del_magic(magic)    # client
    dp.tables.set_magic_ranges([IPRange, ...])                # client: "magic without assignment"
    dp.tables.set_transit(peer_id, transit, real, app_id) / del_transit(peer_id, transit)
    dp.tables.set_transit_ranges([IPRange, ...])              # connector: "unmapped -> reject"

WireGuard sessions (the handshake runs in the control plane; the datapath
seals and opens transport data and keeps counters, replay windows, the
endpoint it learned by roaming, and packets staged while there is no session)::

    dp.install_keypair(peer_id, local_index=..., remote_index=..., send_key=..., receive_key=...,
                       initiator=..., created_ms=..., as_next=...)
    dp.seal(peer_id, packet, now_ms) -> (datagram, (ip, port)) | None  # None: staged or dropped
    dp.take_staged(peer_id) / dp.set_endpoint(peer_id, (ip, port), now_ms)
    dp.clear_sessions(peer_id)                  # its key changed: the old sessions end now
    dp.read_handshakes() -> ([(message, (ip, port))], waiting)  # types 1-3, for the core
    dp.peer_state(peer_id) -> {"endpoint", "rx_bytes", "drops", "sessions", ...}

Run the pumps (two threads per queue, GIL released; the caller owns the fds)::

    dp.start(tun_fd, udp_socket) ... dp.stop()
    dp.start([tun_fd, ...], [udp_socket, ...])  # a multi-queue TUN (IFF_MULTI_QUEUE): one fd
                                                # and one socket per queue, the sockets bound
                                                # to one address with SO_REUSEPORT
    dp.queues, dp.queue_counters() -> [{"tun_rx", "udp_tx", "udp_rx", "tun_tx"}, ...]

Read what happened (wait until ``dp.event_fd`` is readable)::

    dp.read_events() -> [DatapathEvent(kind, role, transit, peer, reason, flow)]
        kind: EventKind.FLOW_CREATED / FLOW_REMOVED (role Role.CLIENT: keep the
              assignment alive), REJECT (re-register that transit IP),
              UNMAPPED_TRANSIT (we rejected a peer's), HANDSHAKE_WANTED (no
              session, or a rekey is due), SESSION_CONFIRMED, UNKNOWN_SESSION
              (data under no session of ours from an endpoint: transit holds its
              address, peer its port)
    dp.counters() -> {"translated": ..., "drop_spoofed": ..., ...}
    dp.sweep(now_ms, limit)   # idle flows; a bounded number per call

Across a restart (a return packet re-creates its flow when the mapping names one
translation; the connector flows whose return packets cannot are saved)::

    blob = dp.save_flows() ... dp.restore_flows(blob, now_ms)  # after the mappings

Times are milliseconds of the monotonic clock (:func:`monotonic_ms`).
``process_from_tun`` / ``process_datagram`` run the exact per-packet code
on one packet without any device, for tests and benchmarks.

Overlay datagrams are WireGuard messages (wire.pxd): transport data, which the
datapath seals and opens, and handshake messages, which it queues. A
connector's reject travels inside the tunnel as an IP packet of protocol 253.
"""

from __future__ import annotations

import time

from ._fastpath import (
    Datapath,
    DatapathEvent,
    EventKind,
    FlowTable,
    Role,
    Tables,
    checksum_replace,
    icmp_unreachable,
    internet_checksum,
    ones_complement_sum,
    parse_packet,
)

# What the daemon and the tests use; the extension is typed by _fastpath.pyi.
__all__ = [
    "Datapath",
    "DatapathEvent",
    "EventKind",
    "FlowTable",
    "Role",
    "Tables",
    "checksum_replace",
    "icmp_unreachable",
    "internet_checksum",
    "monotonic_ms",
    "ones_complement_sum",
    "parse_packet",
]


def monotonic_ms() -> int:
    """The clock the pumps read (CLOCK_MONOTONIC), in milliseconds."""
    return time.monotonic_ns() // 1_000_000
