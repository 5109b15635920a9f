"""What the control plane puts into the datapath: every write to its tables goes through here.

The operations are the control plane's events, not table rows: a
configuration's own addresses, peers and ranges; a client assignment
registered with a connector, or forgotten; a connector mapping installed, or
removed. Each knows which entries it touches and in which order, so that
order is written once (a route before the magic entry that leads to it).
:class:`Ids` numbers nodes and apps for the datapath. On a connector the
datapath's transit table is also where the control plane keeps its mappings
(:class:`ConnectorStore`, the ConnectorTable's store): each is held once.

This module decides nothing (the core and the node do); it touches only
``conn25.fastpath.Tables``, and reads back only the connector's mappings.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

from ..core import policy
from ..core.assignments import Assignment
from ..core.config import NodeConfig
from ..core.connector import Mapping, MappingStore, SavedRow
from ..core.iprange import IPAddress, IPRange
from ..fastpath import Tables

__all__ = ["ConnectorStore", "Dataplane", "Ids"]


class Ids:
    """The datapath's numbers for nodes (peer ids) and apps, stable while the node runs."""

    def __init__(self) -> None:
        self._peers: dict[str, int] = {}
        self._names: dict[int, str] = {}  # the inverse, for log lines
        self._apps: dict[str, int] = {}

    def peer(self, name: str) -> int:
        return self._peers.setdefault(name, len(self._peers) + 1)

    def peer_name(self, peer_id: int | None) -> str:
        """The name behind ``peer_id``, or a placeholder naming the id."""
        if len(self._names) != len(self._peers):
            self._names = {pid: name for name, pid in self._peers.items()}
        return self._names.get(peer_id or 0, f"peer id {peer_id}")

    def app(self, name: str) -> int:
        return self._apps.setdefault(name, len(self._apps) + 1)


def _text(packed: bytes) -> str:
    """A packed address as ``str(ipaddress.ip_address(packed))`` gives it, in a fraction of
    the time for IPv4 (dotted quad either way)."""
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    return str(ipaddress.IPv6Address(packed))


class ConnectorStore(MappingStore):
    """A ConnectorTable's mappings in the datapath's transit table and nowhere else.

    An entry there holds what a :class:`Mapping` needs besides its key: the
    destination, the app (the datapath's app id), the registration time and a
    tag naming the ``(app, peer name)`` pair, interned here. The datapath keys
    a mapping by the peer's id (it knows the peer of a packet from its
    session); the overlay address a mapping was made for is kept here, per
    peer and family.
    """

    def __init__(self, tables: Tables, ids: Ids) -> None:
        self._tables = tables
        self._ids = ids
        self._pairs: list[tuple[str, str]] = [("", "")]  # tag 0: not written through here
        self._tags: dict[tuple[str, str], int] = {}
        self._peer_ids: dict[IPAddress, int] = {}
        self._addresses: dict[tuple[int, int], IPAddress] = {}  # (peer id, family) -> address

    def put(self, m: Mapping) -> bool:
        pair = (m.app, m.peer_name)
        tag = self._tags.get(pair)
        if tag is None:
            tag = self._tags[pair] = len(self._pairs)
            self._pairs.append(pair)
        pid = self._ids.peer(m.peer_name)
        self._peer_ids[m.peer] = pid
        self._addresses[pid, m.peer.version] = m.peer
        return self._tables.set_transit(pid, m.transit, m.destination, self._ids.app(m.app),
                                        m.registered, tag)

    def _mapping(self, pid: int, transit: IPAddress | bytes, real: bytes,
                 registered: float, tag: int) -> Mapping:
        app, name = self._pairs[tag] if tag < len(self._pairs) else ("", "")
        t = ipaddress.ip_address(transit)
        return Mapping(self._addresses[pid, t.version], t, ipaddress.ip_address(real), app,
                       registered, name)

    def get(self, peer: IPAddress, transit: IPAddress) -> Mapping | None:
        pid = self._peer_ids.get(peer)
        if pid is None or self._addresses.get((pid, transit.version)) != peer:
            return None  # no mapping was ever made for this address
        entry = self._tables.transit_entry(pid, transit)
        if entry is None:
            return None
        real, _, registered, tag = entry
        return self._mapping(pid, transit, real, registered, tag)

    def remove(self, peer: IPAddress, transit: IPAddress) -> Mapping | None:
        m = self.get(peer, transit)
        if m is not None:
            self._tables.del_transit(self._peer_ids[peer], transit)
        return m

    def expired(self, before: float, limit: int) -> list[Mapping]:
        return [self._mapping(p, t, r, when, tag)
                for p, t, r, _, when, tag in self._tables.transit_entries(before, limit)]

    def __len__(self) -> int:
        return int(self._tables.stats()["transit"])

    def __iter__(self) -> Iterator[Mapping]:
        # A chunk at a time: 100,000 mappings as objects at once would be tens of MiB.
        # (Nothing writes the table while a caller walks it: the control plane is
        # its only writer, and walks to the end before it changes anything.)
        start = 0
        while start >= 0:
            rows, start = self._tables.transit_chunk(start, 1024)
            for p, t, r, _, when, tag in rows:
                yield self._mapping(p, t, r, when, tag)

    def saved_rows(self) -> Iterator[SavedRow]:
        # Packed addresses to text without address objects: a connector saves every
        # mapping after each burst of registrations, in the event loop.
        start = 0
        pairs = self._pairs
        peers: dict[tuple[int, int], str] = {}  # (peer id, family) -> its address's text
        while start >= 0:
            rows, start = self._tables.transit_chunk(start, 1024)
            for pid, t, r, _, when, tag in rows:
                app, name = pairs[tag] if tag < len(pairs) else ("", "")
                key = (pid, 4 if len(t) == 4 else 6)
                peer = peers.get(key)
                if peer is None:
                    peer = peers[key] = str(self._addresses[key])
                yield peer, _text(t), _text(r), app, when, name


class Dataplane:
    """The datapath's tables as the control plane changes them."""

    def __init__(self, tables: Tables, ids: Ids) -> None:
        self._tables = tables
        self.ids = ids
        self._peers: set[str] = set()  # the peers installed by the last install_config
        self.connector_store = ConnectorStore(tables, ids)

    def install_config(self, cfg: NodeConfig) -> None:
        """Own addresses, peers and ranges of ``cfg``; peers it no longer has are removed.

        Again after a reload: every entry is replaced in place.
        """
        tables = self._tables
        peers = cfg.peers
        for name in self._peers - {n.name for n in peers}:
            tables.del_peer(self.ids.peer(name))
        self._peers = {n.name for n in peers}
        tables.set_local(list(cfg.node.addresses))
        for peer in peers:
            # Without an endpoint, the peer is reachable once it made contact.
            host, port = peer.endpoint or (None, 0)
            tables.set_peer(self.ids.peer(peer.name),
                            None if host is None else ipaddress.ip_address(host), port,
                            list(peer.addresses))
        tables.set_magic_ranges(list(cfg.pools.v4_magic) + list(cfg.pools.v6_magic))
        if cfg.advertise_connector:
            # Any node's transit IPs may arrive here; the unmapped ones get a reject.
            transit: set[IPRange] = set()
            for n in cfg.tailnet.nodes:
                p = policy.pools_for(cfg.tailnet, n)
                transit.update(p.v4_transit, p.v6_transit)
            tables.set_transit_ranges(sorted(transit))

    def client_registered(self, a: Assignment, connector: str) -> None:
        """``a``'s magic IP now leads through its transit IP to node ``connector``."""
        # Route first: a packet that finds the magic entry must find the route too.
        self._tables.set_route(a.transit, self.ids.peer(connector))
        self._tables.set_magic(a.magic, a.transit)

    def client_forgotten(self, a: Assignment) -> None:
        """``a`` was reclaimed: its magic IP is unassigned again from now on."""
        self._tables.del_magic(a.magic)
        self._tables.del_route(a.transit)
