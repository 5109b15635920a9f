"""The connector's tables: which transit IP of which peer goes to which real address.

A client registers ``transit → destination`` for an app; the datapath later
looks the pair ``(peer overlay address, transit IP)`` up for the first packet
of a flow. The peer address is the peer's first overlay address of the
transit IP's family, because that is the source address the datapath sees.

Beyond upstream, which maps whatever destination a client names (an open
relay), a mapping is accepted only to an address that the app's domains
resolved to *here*. The daemon feeds those answers in with
:meth:`ConnectorTable.note_resolution`:

* every answer the connector serves on the peer API's DNS endpoint for an
  app, and
* before :meth:`ConnectorTable.handle_request`, a fresh resolution of each
  ``(app, domain)`` pair that :meth:`ConnectorTable.needs_resolution` lists
  for the request (items that carry a ``domain`` whose destination is not
  known yet).

``note_resolution`` itself refuses a domain that is not one of the app's, so
a client cannot get an arbitrary name resolved into the allowed set.

Memory: a connector may hold 100,000 mappings, so they are not kept as
objects. Each peer address has a dict ``transit (int) -> packed int`` in
order of last registration (a re-registration moves its key to the end);
the packed int holds the destination, the registration time's float bits
and the id of the ``(app, peer name)`` pair (the daemon keeps them in the
datapath's transit table instead). Resolution records are sorted arrays of
addresses and expiries per app (:class:`Resolutions`). :class:`Mapping`
objects are made when asked for.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import itertools
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import msgspec

from . import config, policy
from .iprange import IPAddress
from .peerapi import (
    Code,
    ConnectorTransitIPRequest,
    ConnectorTransitIPResponse,
    NotConfigured,
    TransitIPRequest,
    TransitIPResponse,
)
from .throttle import TokenBucket

# Upstream keeps a mapping at least an hour after its last registration;
# clients re-register on a reject, so an expired mapping costs one round trip.
MAPPING_LIFETIME = 3600.0
# Per peer: a browser starting up asks for a couple of thousand fresh names, an A and an
# AAAA each, at once, and all of that fits the burst; a flood gets the sustained rate.
DEFAULT_RATE = 50.0  # registrations per second per peer, sustained
DEFAULT_BURST = 4096

DUPLICATE_MESSAGE = "transit IP appears more than once in the request"
NO_PEER_FAMILY_MESSAGE = "peer has no overlay address of the transit IP's family"
FAMILY_MISMATCH_MESSAGE = "transit and destination IPs must be of the same family"
UNKNOWN_APP_MESSAGE = "the app is not one this connector serves"
MISSING_PERMISSION_MESSAGE = "peer is not allowed to use apps through this connector"
RATE_LIMITED_MESSAGE = "rate limited"


class Mapping(msgspec.Struct, frozen=True):
    peer: IPAddress  # the peer's overlay address of the transit IP's family
    transit: IPAddress
    destination: IPAddress
    app: str
    registered: float  # time of the last registration
    peer_name: str

    @property
    def expires(self) -> float:
        return self.registered + MAPPING_LIFETIME


# -- compact storage -----------------------------------------------------------

_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_V6_TAG = 1 << 128  # resolution keys: IPv6 addresses above every IPv4 one
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


def _float_bits(x: float) -> int:
    return _U64.unpack(_F64.pack(x))[0]


def _bits_float(b: int) -> float:
    return _F64.unpack(_U64.pack(b))[0]


def _addr_tag(a: IPAddress) -> int:
    return int(a) if a.version == 4 else int(a) | _V6_TAG


class MappingStore(Protocol):
    """Where a :class:`ConnectorTable` keeps its mappings, one per (peer, transit).

    :class:`PackedStore` by default; the daemon keeps them in the datapath's
    transit table instead (``dataplane.ConnectorStore``), so that a connector
    holds each mapping once.
    """

    def put(self, m: Mapping) -> bool:
        """Store ``m``, replacing the mapping of its (peer, transit); True if there was none."""
        ...

    def get(self, peer: IPAddress, transit: IPAddress) -> Mapping | None: ...

    def remove(self, peer: IPAddress, transit: IPAddress) -> Mapping | None:
        """Remove and return the mapping of (peer, transit), if any."""
        ...

    def expired(self, before: float, limit: int) -> list[Mapping]:
        """Up to ``limit`` mappings registered before ``before``, the oldest first."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Mapping]: ...

    def saved_rows(self) -> Iterator[SavedRow]:
        """Every mapping as a snapshot saves it, in iteration order, addresses as text:
        a snapshot costs no Mapping (and no address objects) per row."""
        ...


# (peer, transit, destination, app, registered, peer name): a mapping as a snapshot saves it.
SavedRow = tuple[str, str, str, str, float, str]


def saved_row(m: Mapping) -> SavedRow:
    return (str(m.peer), str(m.transit), str(m.destination), m.app, m.registered, m.peer_name)


class Resolutions:
    """One app's resolution records, address -> expiry (wall-clock seconds), compact.

    Most records live in sorted arrays per family (IPv4: the address in 4 bytes;
    IPv6: its two 64-bit halves), each with its expiry in 8: 12 and 24 bytes a
    record, where a dict costs about 100. New addresses wait in a small dict and
    are merged into the arrays ``MERGE_AT`` at a time.
    """

    MERGE_AT = 4096

    __slots__ = ("_recent", "_v4", "_v6")

    def __init__(self) -> None:
        # Columns: the address's (one or two), then the expiry.
        self._v4: list[array[Any]] = [array("I"), array("d")]
        self._v6: list[array[Any]] = [array("Q"), array("Q"), array("d")]
        self._recent: dict[int, float] = {}  # tag (_addr_tag) -> expiry; in no array

    def __len__(self) -> int:
        return len(self._recent) + len(self._v4[0]) + len(self._v6[0])

    def _index(self, tag: int) -> int:
        """Where the address of ``tag`` is in its family's arrays, or -1."""
        if tag < _V6_TAG:
            k4 = self._v4[0]
            i = bisect.bisect_left(k4, tag)
            return i if i < len(k4) and k4[i] == tag else -1
        hi_col, lo_col = self._v6[0], self._v6[1]
        hi, lo = (tag >> 64) & _U64_MAX, tag & _U64_MAX
        a = bisect.bisect_left(hi_col, hi)
        b = bisect.bisect_right(hi_col, hi, a)
        i = bisect.bisect_left(lo_col, lo, a, b)
        return i if i < b and lo_col[i] == lo else -1

    def expiry(self, addr: IPAddress) -> float | None:
        tag = _addr_tag(addr)
        expires = self._recent.get(tag)
        if expires is not None:
            return expires
        i = self._index(tag)
        return None if i < 0 else (self._v4 if tag < _V6_TAG else self._v6)[-1][i]

    def note(self, addr: IPAddress, expires: float) -> None:
        """``addr`` resolved until ``expires``; a record that lasts longer stays as it is."""
        tag = _addr_tag(addr)
        i = self._index(tag)
        if i >= 0:
            exps = (self._v4 if tag < _V6_TAG else self._v6)[-1]
            if exps[i] < expires:
                exps[i] = expires
            return
        old = self._recent.get(tag)
        if old is None or old < expires:
            self._recent[tag] = expires
        if len(self._recent) >= self.MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        recent = sorted(self._recent.items())  # (its keys are in no array: a plain merge)
        self._recent = {}
        v4 = [(k, e) for k, e in recent if k < _V6_TAG]
        v6 = [((k >> 64) & _U64_MAX, k & _U64_MAX, e) for k, e in recent if k >= _V6_TAG]
        self._v4 = _merged(self._v4, v4)
        self._v6 = _merged(self._v6, v6)

    def sweep(self, now: float, budget: int) -> int:
        """Drop up to ``budget`` records that expired before ``now``; how many went.
        A scan of the arrays: a few ms per 100,000 records."""
        gone = list(itertools.islice((t for t, e in self._recent.items() if e < now), budget))
        for tag in gone:
            del self._recent[tag]
        n = len(gone)
        for family in ("_v4", "_v6"):
            cols = getattr(self, family)
            drop = set(itertools.islice((i for i, e in enumerate(cols[-1]) if e < now),
                                        max(0, budget - n)))
            if drop:
                setattr(self, family, [array(c.typecode, (x for i, x in enumerate(c)
                                                          if i not in drop)) for c in cols])
                n += len(drop)
        return n


def _merged(cols: list[array[Any]], rows: list[tuple[Any, ...]]) -> list[array[Any]]:
    """Columns with the sorted ``rows`` (one value per column, none of them there yet)
    merged in, as new arrays of their final size at once: grown an item at a time,
    their outgrown buffers would stay behind in the heap."""
    if not rows:
        return cols
    n = len(cols[0]) + len(rows)
    out = [array(c.typecode, bytes(c.itemsize * n)) for c in cols]
    for j, row in enumerate(heapq.merge(zip(*cols, strict=True), rows)):
        for col, x in zip(out, row, strict=True):
            col[j] = x
    return out


class _PeerMappings:
    """One peer address's mappings: ``transit -> dest | time bits << W | pair << W + 64``.

    W is the family's address width. The dict is in order of last
    registration, oldest first.
    """

    __slots__ = ("addr", "make", "maps", "width")

    def __init__(self, addr: IPAddress) -> None:
        self.addr = addr
        self.width = 32 if addr.version == 4 else 128
        self.make = ipaddress.IPv4Address if addr.version == 4 else ipaddress.IPv6Address
        self.maps: dict[int, int] = {}

    def registered(self, value: int) -> float:
        return _bits_float((value >> self.width) & 0xFFFF_FFFF_FFFF_FFFF)

    def oldest(self, limit: int) -> Iterator[tuple[int, int]]:
        """Up to ``limit`` (transit, value) pairs, oldest registration first."""
        return itertools.islice(self.maps.items(), limit)


class PackedStore:
    """Mappings in Python, packed: per peer address a dict ``transit -> one int``.

    The int holds the destination, the registration time's float bits (exact)
    and the id of the interned ``(app, peer name)`` pair.
    """

    def __init__(self) -> None:
        self._peers: dict[IPAddress, _PeerMappings] = {}
        self._count = 0
        self._pairs: list[tuple[str, str]] = []
        self._pair_ids: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return self._count

    def put(self, m: Mapping) -> bool:
        table = self._peers.get(m.peer)
        if table is None:
            table = self._peers[m.peer] = _PeerMappings(m.peer)
        pair = (m.app, m.peer_name)
        pair_id = self._pair_ids.get(pair)
        if pair_id is None:
            pair_id = self._pair_ids[pair] = len(self._pairs)
            self._pairs.append(pair)
        key = int(m.transit)
        # Re-insert: the newest registration goes last.
        new = table.maps.pop(key, None) is None
        self._count += new
        table.maps[key] = (
            int(m.destination) | (_float_bits(m.registered) | pair_id << 64) << table.width
        )
        return new

    def _mapping(self, table: _PeerMappings, transit: int, value: int) -> Mapping:
        w = table.width
        app, name = self._pairs[value >> (w + 64)]
        return Mapping(
            table.addr, table.make(transit), table.make(value & ((1 << w) - 1)), app,
            table.registered(value), name,
        )

    def get(self, peer: IPAddress, transit: IPAddress) -> Mapping | None:
        table = self._peers.get(peer)
        if table is None or (value := table.maps.get(int(transit))) is None:
            return None
        return self._mapping(table, int(transit), value)

    def remove(self, peer: IPAddress, transit: IPAddress) -> Mapping | None:
        table = self._peers.get(peer)
        if table is None or (value := table.maps.pop(int(transit), None)) is None:
            return None
        self._count -= 1
        if not table.maps:  # a peer without mappings is gone from the state too
            del self._peers[table.addr]
        return self._mapping(table, int(transit), value)

    def expired(self, before: float, limit: int) -> list[Mapping]:
        # Each peer's expired run from its oldest end, then the oldest `limit` of all.
        due: list[tuple[float, int, int, _PeerMappings, int]] = []
        for n, table in enumerate(self._peers.values()):
            for transit, value in table.oldest(limit):
                registered = table.registered(value)
                if registered >= before:
                    break
                due.append((registered, n, transit, table, value))
        due.sort(key=lambda d: (d[0], d[1]))  # stable: each peer's own order stays
        return [self._mapping(table, transit, value) for _, _, transit, table, value in due[:limit]]

    def __iter__(self) -> Iterator[Mapping]:
        """Peer by peer, oldest registration first within a peer."""
        for table in self._peers.values():
            for transit, value in table.maps.items():
                yield self._mapping(table, transit, value)

    def saved_rows(self) -> Iterator[SavedRow]:
        return map(saved_row, self)


_SNAPSHOT_CHUNK = 1024  # rows encoded at a time

# The state view (`conn25d status`): text fields so that it encodes as JSON.


class _SavedMapping(msgspec.Struct, array_like=True):
    peer: str
    transit: str
    destination: str
    app: str
    registered: float
    peer_name: str


class MappingView(msgspec.Struct):
    transit: str
    destination: str
    app: str
    expires: float


class PeerView(msgspec.Struct):
    name: str
    apps: list[str]
    mappings: list[MappingView]


class ConnectorState(msgspec.Struct, omit_defaults=True):
    configured: bool
    apps: list[str] = []
    peers: list[PeerView] = []


def _addr_key(a: IPAddress) -> tuple[int, int]:
    return (a.version, int(a))


def _unusable_destination(addr: IPAddress) -> str | None:
    """Why ``addr`` can never be an egress destination, or None.

    Catches answers that point back into the connector itself or its link
    (loopback, cloud metadata on link-local) even when DNS returned them.
    """
    check = addr
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        check = addr.ipv4_mapped
    for flag, what in (
        (check.is_unspecified, "unspecified"),
        (check.is_loopback, "loopback"),
        (check.is_link_local, "link-local"),
        (check.is_multicast, "multicast"),
    ):
        if flag:
            return f"destination {addr} is a {what} address"
    return None


class ConnectorTable:
    """Per-peer transit-IP mappings of one connector node, and what it resolved.

    Time is passed in (wall-clock seconds); nothing here reads a clock.
    """

    def __init__(
        self,
        cfg: config.NodeConfig,
        *,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        store: MappingStore | None = None,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limit needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self._rate = rate
        self._burst = burst
        self._cfg = cfg
        self._own: dict[str, config.App] = {}
        # Where the mappings are: by default here, in the daemon the datapath's table.
        self.store: MappingStore = PackedStore() if store is None else store
        self._resolved: dict[str, Resolutions] = {}  # per app
        self._buckets: dict[str, TokenBucket] = {}
        self._set_config(cfg)

    def _set_config(self, cfg: config.NodeConfig) -> None:
        self._cfg = cfg
        self._own = {a.name: a for a in cfg.own_apps}
        # A peer's pools come from the node attributes that target it: one answer
        # for every item and mapping of that peer until the next configuration,
        # not a walk over the attributes' selectors per item.
        self._peer_pools: dict[config.Member, config.Pools] = {}

    def _pools_of(self, peer: config.Member) -> config.Pools:
        pools = self._peer_pools.get(peer)
        if pools is None:
            pools = self._peer_pools[peer] = policy.pools_for(self._cfg.tailnet, peer)
        return pools

    @property
    def configured(self) -> bool:
        """This node advertises as a connector and carries the tag of at least one app."""
        return bool(self._own)

    def __len__(self) -> int:
        """Number of mappings, over all peers."""
        return len(self.store)

    @property
    def resolutions(self) -> int:
        """Number of (app, address) resolution records kept."""
        return sum(map(len, self._resolved.values()))

    # -- registration -------------------------------------------------------

    def handle_request(
        self, peer: config.Member, req: ConnectorTransitIPRequest, now: float
    ) -> ConnectorTransitIPResponse:
        """Register the request's mappings for ``peer``; one result per item, in order.

        Raises NotConfigured when this node serves no app (the HTTP layer
        answers 503).
        """
        return self.register(peer, req, now)[0]

    def register(
        self, peer: config.Member, req: ConnectorTransitIPRequest, now: float
    ) -> tuple[ConnectorTransitIPResponse, list[Mapping]]:
        """As :meth:`handle_request`, also returning the mappings stored (for the datapath)."""
        if not self.configured:
            raise NotConfigured(f"{self._cfg.node.name} serves no app")
        permitted = self._cfg.may_use_apps(peer)
        bucket = self._bucket(peer, now)
        seen: set[IPAddress] = set()
        results: list[TransitIPResponse] = []
        stored: list[Mapping] = []
        for item in req.transit_ips:
            transit = item.transit
            if transit in seen:
                results.append(TransitIPResponse(Code.DUPLICATE_TRANSIT_IP, DUPLICATE_MESSAGE))
                continue
            seen.add(transit)
            if not bucket.take(now):
                results.append(TransitIPResponse(Code.OTHER, RATE_LIMITED_MESSAGE))
                continue
            code, message = self._check(peer, permitted, item, now)
            if code == Code.OK:
                stored.append(self._store(peer, item, now))
            results.append(TransitIPResponse(code, message))
        return ConnectorTransitIPResponse(results), stored

    def _check(
        self, peer: config.Member, permitted: bool, item: TransitIPRequest, now: float
    ) -> tuple[Code, str]:
        """The item's code: upstream's order, with permission before the app lookup."""
        transit, dest = item.transit, item.destination
        if transit.version != dest.version:
            return Code.FAMILY_MISMATCH, FAMILY_MISMATCH_MESSAGE
        if peer.address(transit.version) is None:
            return Code.NO_PEER_FAMILY, NO_PEER_FAMILY_MESSAGE
        # Before the app check, so that a peer without permission cannot
        # probe which app names exist.
        if not permitted:
            return Code.MISSING_PERMISSION, MISSING_PERMISSION_MESSAGE
        app = self._own.get(item.app)
        if app is None:
            return Code.UNKNOWN_APP, f"{UNKNOWN_APP_MESSAGE} ({item.app!r})"
        # The client allocates from its own pools, which may differ from ours.
        if not self._pools_of(peer).is_transit(transit):
            return Code.OTHER, f"transit IP {transit} is outside {peer.name}'s transit IP pools"
        if (why := self._unusable(dest)) is not None:
            return Code.OTHER, why
        if item.domain is not None and not self._is_app_domain(app, item.domain):
            return Code.OTHER, f"domain {item.domain} is not a domain of app {app.name!r}"
        if not self._was_resolved(app.name, dest, now):
            return Code.OTHER, (
                f"destination {dest} is not an address that app {app.name!r} resolved to "
                "at this connector within the answer's TTL"
            )
        return Code.OK, ""

    def _unusable(self, dest: IPAddress) -> str | None:
        if (why := _unusable_destination(dest)) is not None:
            return why
        pools = self._cfg.pools
        if dest in pools.magic(dest.version) or pools.is_transit(dest):
            return f"destination {dest} is in a magic or transit IP pool"
        if self._cfg.peer_by_address(dest) is not None:
            return f"destination {dest} is a node's overlay address"
        return None

    def _store(self, peer: config.Member, item: TransitIPRequest, now: float) -> Mapping:
        peer_addr = peer.address(item.transit.version)
        assert peer_addr is not None  # _check returned NO_PEER_FAMILY otherwise
        m = Mapping(peer_addr, item.transit, item.destination, item.app, now, peer.name)
        self.store.put(m)
        return m

    def _bucket(self, peer: config.Member, now: float) -> TokenBucket:
        b = self._buckets.get(peer.name)
        if b is None:
            b = self._buckets[peer.name] = TokenBucket(self._rate, self._burst, now)
        return b

    # -- what the connector resolved -----------------------------------------

    def _is_app_domain(self, app: config.App, domain: str) -> bool:
        # The same matching a client uses to pick the app for a name.
        return app in self._cfg.apps_for_name(domain)

    def note_resolution(
        self, app: str, domain: str, addrs: Iterable[tuple[IPAddress, int]], now: float
    ) -> bool:
        """Record that ``domain`` of ``app`` resolved here to ``addrs`` (address, TTL).

        Each address is then an acceptable destination for the app until
        its TTL runs out. Returns False, recording nothing, when this node
        does not serve ``app`` or ``domain`` is not one of its domains.
        """
        a = self._own.get(app)
        if a is None or not self._is_app_domain(a, domain):
            return False
        records = self._resolved.get(app)
        if records is None:
            records = self._resolved[app] = Resolutions()
        for addr, ttl in addrs:
            records.note(addr, now + max(0, ttl))  # a shorter answer does not shorten it
        return True

    def _was_resolved(self, app: str, dest: IPAddress, now: float) -> bool:
        records = self._resolved.get(app)
        if records is None or getattr(dest, "scope_id", None):
            return False  # (answers carry no IPv6 scope: a scoped address was never one)
        expires = records.expiry(dest)
        return expires is not None and now <= expires

    def needs_resolution(
        self, peer: config.Member, req: ConnectorTransitIPRequest, now: float
    ) -> list[tuple[str, str]]:
        """``(app, domain)`` pairs the daemon should resolve before handling ``req``.

        Only items that carry a domain of an app this node serves, from a
        permitted peer, whose destination is not known yet; no more items
        than the peer's rate limit would let through, so a request cannot
        make the connector resolve without bound. Each pair once, in order.
        """
        if not self.configured or not self._cfg.may_use_apps(peer):
            return []
        budget = int(self._bucket(peer, now).level(now))
        pairs: dict[tuple[str, str], None] = {}
        for item in req.transit_ips[:budget]:
            app = self._own.get(item.app)
            if (
                app is not None
                and item.domain is not None
                and self._is_app_domain(app, item.domain)
                and not self._was_resolved(app.name, item.destination, now)
            ):
                pairs[(app.name, item.domain)] = None
        return list(pairs)

    # -- datapath queries -----------------------------------------------------

    def lookup(self, peer_addr: IPAddress, transit: IPAddress) -> Mapping | None:
        if transit.version != peer_addr.version:
            return None
        return self.store.get(peer_addr, transit)

    def is_unmapped_transit(self, peer_addr: IPAddress, transit: IPAddress) -> bool:
        """A transit IP this peer has not mapped here: the datapath drops and rejects it."""
        if not self.configured or self.lookup(peer_addr, transit) is not None:
            return False
        peer = self._cfg.peer_by_address(peer_addr)
        return peer is not None and self._pools_of(peer).is_transit(transit)

    # -- maintenance ------------------------------------------------------------

    def sweep(self, now: float, limit: int) -> list[Mapping]:
        """Remove up to ``limit`` mappings registered over an hour ago; return them.

        Also drops up to ``limit`` expired resolution records and idle rate
        limit state. Call again while it returns ``limit`` mappings. Mappings
        are visited in registration order (each peer's oldest first, the
        peers merged by registration time), so a wall clock stepping back
        only delays removals.
        """
        if limit < 0:
            raise ValueError(f"sweep limit must not be negative (got {limit})")
        removed = []
        for m in self.store.expired(now - MAPPING_LIFETIME, limit):
            if (gone := self.store.remove(m.peer, m.transit)) is not None:
                removed.append(gone)

        # Expired resolution records: a scan, not a heap (a heap entry per record
        # would cost more memory than the record).
        budget = limit
        for records in self._resolved.values():
            if budget <= 0:
                break
            budget -= records.sweep(now, budget)

        # A full bucket is the same as no bucket.
        for name in [n for n, b in self._buckets.items() if b.full(now)]:
            del self._buckets[name]
        return removed

    def reconfigure(self, cfg: config.NodeConfig) -> list[Mapping]:
        """Switch to ``cfg``; remove and return the mappings it no longer allows.

        A mapping goes when its app is no longer served, its peer is gone,
        has another address, or lost permission, or its transit IP left the
        pools. Rate-limit state stays.
        """
        self._set_config(cfg)
        gone = [m for m in self.store if self._refusal(m) is not None]
        removed = [r for m in gone if (r := self.store.remove(m.peer, m.transit)) is not None]
        for app in [a for a in self._resolved if a not in self._own]:
            del self._resolved[app]
        return removed

    def _refusal(self, m: Mapping) -> str | None:
        """Why the current configuration no longer allows mapping ``m``, or None."""
        cfg = self._cfg
        node = cfg.peer_by_address(m.peer)
        if m.app not in self._own:
            return f"app {m.app!r} is not served here"
        if node is None or node.name != m.peer_name or node.address(m.peer.version) != m.peer:
            return f"peer {m.peer_name} does not have the address {m.peer}"
        if not self._pools_of(node).is_transit(m.transit):
            return f"transit IP {m.transit} is outside {node.name}'s transit IP pools"
        if not cfg.may_use_apps(node):
            return MISSING_PERMISSION_MESSAGE
        return self._unusable(m.destination)

    # -- persistence -------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Every mapping as JSON, for :meth:`restore` after a restart."""
        return b"".join(self.snapshot_chunks())

    def snapshot_chunks(self) -> Iterator[bytes]:
        """:meth:`snapshot` in pieces, a chunk of rows at a time: the node writes one
        after every burst of registrations, and 100,000 rows as objects, or their
        JSON in one piece, would be tens of MiB at once."""
        yield b"["
        rows: list[_SavedMapping] = []
        first = True
        for row in self.store.saved_rows():
            rows.append(_SavedMapping(*row))
            if len(rows) == _SNAPSHOT_CHUNK:
                yield (b"" if first else b",") + msgspec.json.encode(rows)[1:-1]
                rows, first = [], False
        if rows:
            yield (b"" if first else b",") + msgspec.json.encode(rows)[1:-1]
        yield b"]"

    def restore(
        self, data: bytes, now: float, report: Callable[[str], object]
    ) -> list[Mapping]:
        """Load a :meth:`snapshot` taken before a restart, so that the flows in
        flight through this connector come back with their next packet; returns
        the mappings restored (for the datapath).

        Mappings past their lifetime are left out silently; those the current
        configuration does not allow are left out with one ``report`` line
        each. ValueError on a snapshot that cannot be read (nothing changed).
        """
        try:
            saved = msgspec.json.decode(data, type=list[_SavedMapping])
            rows = [
                Mapping(ipaddress.ip_address(r.peer), ipaddress.ip_address(r.transit),
                        ipaddress.ip_address(r.destination), r.app, r.registered, r.peer_name)
                for r in saved
            ]
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            raise ValueError(f"bad connector snapshot: {e}") from None
        out: list[Mapping] = []
        for m in sorted(rows, key=lambda m: m.registered):  # each peer's oldest first
            if now - m.registered > MAPPING_LIFETIME:
                continue
            why = (FAMILY_MISMATCH_MESSAGE
                   if not m.peer.version == m.transit.version == m.destination.version
                   else self._refusal(m))
            if why is None and self.lookup(m.peer, m.transit) is not None:
                why = "transit IP saved twice for this peer"
            if why is not None:
                report(f"dropping saved mapping peer={m.peer_name} transit={m.transit} -> "
                       f"{m.destination} app={m.app}: {why}")
                continue
            self.store.put(m)
            out.append(m)
        return out

    # -- state ------------------------------------------------------------------

    def state(self) -> ConnectorState:
        """The connector part of ``conn25d status``: peers by name, mappings by transit IP."""
        if not self.configured:
            return ConnectorState(configured=False)
        by_name: dict[str, list[Mapping]] = {}
        for m in self.store:
            by_name.setdefault(m.peer_name, []).append(m)
        peers = [
            PeerView(
                name=name,
                apps=sorted({m.app for m in ms}),
                mappings=[
                    MappingView(str(m.transit), str(m.destination), m.app, m.expires)
                    for m in sorted(ms, key=lambda m: _addr_key(m.transit))
                ],
            )
            for name, ms in sorted(by_name.items())
        ]
        return ConnectorState(configured=True, apps=sorted(self._own), peers=peers)
