"""The client's address assignments: (domain, real IP) -> magic IP + transit IP.

One assignment per (domain, real address), found by magic IP (the datapath,
from the application's packets), by transit IP (events from the datapath and
the connector's rejects) and by (domain, real) (repeated DNS answers).

Expiry follows the DNS TTL, but an expired assignment keeps working until it
is reclaimed, and it is reclaimed only when no flow uses it and none has for
two minutes: an application may keep using a cached answer well past its
TTL, and yanking the magic IP under an open connection would break it.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from collections.abc import Callable, Iterable, Iterator

import msgspec

from .config import Pools
from .ippool import IPPool, PoolExhausted
from .iprange import IPAddress

__all__ = ["Assignment", "AssignmentError", "Assignments", "PoolExhausted", "clamp_ttl"]

MIN_TTL = 60
MAX_TTL = 72 * 3600
FLOW_GRACE = 120  # seconds after the last flow ended before an expired assignment may go
EXTEND = 24 * 3600  # how far an expired assignment that is still in use moves on


def clamp_ttl(ttl: int) -> int:
    return max(MIN_TTL, min(MAX_TTL, int(ttl)))


class AssignmentError(Exception):
    pass


class Assignment(msgspec.Struct):
    magic: IPAddress
    transit: IPAddress
    real: IPAddress
    app: str
    domain: str  # normalised FQDN
    expiry: float
    connector: str | None = None  # node name the transit IP is registered with
    active_flows: int = 0
    last_flow_end: float | None = None


class _Saved(msgspec.Struct, frozen=True):
    """The persisted form (msgspec cannot encode ipaddress objects)."""

    magic: str
    transit: str
    real: str
    app: str
    domain: str
    expiry: float
    connector: str | None = None


class Assignments:
    """``on_reclaim`` is called for every reclaimed assignment, also those
    reclaimed inside :meth:`reserve`, so the datapath forgets them at once."""

    def __init__(self, pools: Pools,
                 on_reclaim: Callable[[Assignment], None] | None = None) -> None:
        self.on_reclaim = on_reclaim
        self._magic = {4: IPPool(), 6: IPPool()}
        self._transit = {4: IPPool(), 6: IPPool()}
        self._by_magic: dict[IPAddress, Assignment] = {}
        self._by_transit: dict[IPAddress, Assignment] = {}
        self._by_domain_real: dict[tuple[str, IPAddress], Assignment] = {}
        self._by_domain: dict[str, dict[IPAddress, Assignment]] = {}  # by real address
        # Expiry order: a heap with lazy deletion; an entry is live only while
        # its expiry equals the assignment's current one.
        self._heap: list[tuple[float, int, IPAddress]] = []
        self._seq = itertools.count()
        # The snapshot's JSON row of each assignment, re-encoded only when it changed:
        # formatting IP addresses costs µs each, and the node persists after every burst.
        self._rows: dict[IPAddress, bytes] = {}
        self._stale: set[IPAddress] = set()  # by magic IP: rows to encode or drop
        self._snapshotted = False
        self._pools = pools
        self.reconfigure(pools)

    # -- configuration -------------------------------------------------------

    def reconfigure(self, pools: Pools) -> None:
        self._pools = pools
        for v in (4, 6):
            self._magic[v].reconfigure(pools.magic(v))
            self._transit[v].reconfigure(pools.transit(v))

    # -- lookups ---------------------------------------------------------------

    def by_magic(self, ip: IPAddress) -> Assignment | None:
        return self._by_magic.get(ip)

    def by_transit(self, ip: IPAddress) -> Assignment | None:
        return self._by_transit.get(ip)

    def by_domain_real(self, domain: str, real: IPAddress) -> Assignment | None:
        return self._by_domain_real.get((domain, real))

    def by_domain(self, domain: str) -> list[Assignment]:
        """The assignments of ``domain`` (a normalised FQDN), one per real address."""
        return list(self._by_domain.get(domain, {}).values())

    def by_connector(self, connector: str) -> list[Assignment]:
        return [a for a in self._by_transit.values() if a.connector == connector]

    def __len__(self) -> int:
        return len(self._by_magic)

    def __iter__(self) -> Iterator[Assignment]:
        return iter(list(self._by_magic.values()))

    def pool_usage(self) -> dict[str, dict[str, int]]:
        """In use and capacity of each pool, keyed "v4Magic", "v6Transit", ..."""
        out = {}
        for kind, pools in (("Magic", self._magic), ("Transit", self._transit)):
            for v, pool in pools.items():
                out[f"v{v}{kind}"] = {"inUse": pool.in_use, "capacity": pool.capacity}
        return out

    # -- making and keeping assignments ----------------------------------------

    def reserve(
        self, app: str, domain: str, real: IPAddress, ttl: int, now: float,
        transit: IPAddress | None = None,
    ) -> tuple[Assignment, bool]:
        """The assignment for (domain, real), made if needed; (assignment, created).

        A repeated answer reuses the assignment (expired or not) and moves
        its expiry to now + TTL. A new one takes ``transit`` when given (one
        of :meth:`take_transits`', which a connector mapped already), else
        the pool's next. Raises PoolExhausted when either pool of the family
        is full even after reclaiming.
        """
        existing = self._by_domain_real.get((domain, real))
        if existing is not None:
            self._set_expiry(existing, now + clamp_ttl(ttl))
            return existing, False
        if transit is not None and (transit.version != real.version
                                    or transit in self._by_transit):
            raise AssignmentError(f"transit IP {transit} cannot be given to {real}")
        self.reclaim(now)
        magic = self._magic[real.version].next()
        if transit is None:
            try:
                transit = self._transit[real.version].next()
            except PoolExhausted:
                self._magic[real.version].release(magic)
                raise
        a = Assignment(magic, transit, real, app, domain, now + clamp_ttl(ttl))
        self.insert(a)
        return a, True

    def take_transits(self, version: int, n: int) -> list[IPAddress]:
        """Up to ``n`` free transit IPs of ``version``, taken from the pool but assigned to
        nothing: offers for a connector to map an answer onto. Never more than half of
        what is free, so that offers in flight do not starve ordinary reservations.
        Give back what no assignment took with :meth:`release_transits`."""
        pool = self._transit[version]
        out: list[IPAddress] = []
        for _ in range(min(n, (pool.capacity - pool.in_use) // 2)):
            try:
                out.append(pool.next())
            except PoolExhausted:
                break
        return out

    def release_transits(self, transits: Iterable[IPAddress]) -> None:
        """Return taken transit IPs that no assignment holds to their pool."""
        for t in transits:
            if t not in self._by_transit:
                self._transit[t.version].release(t)

    def insert(self, a: Assignment) -> None:
        """Add ``a``; AssignmentError if any of its keys is taken (even by an expired one)."""
        # The message made only when one is taken: every fresh name comes through here.
        if a.magic in self._by_magic:
            raise AssignmentError(f"magic IP {a.magic} is already assigned")
        if a.transit in self._by_transit:
            raise AssignmentError(f"transit IP {a.transit} is already assigned")
        if (a.domain, a.real) in self._by_domain_real:
            raise AssignmentError(f"({a.domain}, {a.real}) is already assigned")
        self._by_magic[a.magic] = a
        self._by_transit[a.transit] = a
        self._by_domain_real[(a.domain, a.real)] = a
        self._by_domain.setdefault(a.domain, {})[a.real] = a
        self._push(a)
        self._stale.add(a.magic)

    def attach(self, transit: IPAddress, connector: str) -> None:
        """Record that ``transit`` is registered with node ``connector``.

        Attaching the same pair again is harmless; a transit IP we did not
        assign, or a connector without a name, is an error.
        """
        a = self._by_transit.get(transit)
        if a is None:
            raise AssignmentError(f"transit IP {transit} is not assigned")
        if not connector:
            raise AssignmentError(f"transit IP {transit}: connector has no identity")
        a.connector = connector
        self._stale.add(a.magic)

    def flow_started(self, transit: IPAddress, now: float) -> None:
        a = self._by_transit.get(transit)
        if a is not None:
            a.active_flows += 1

    def flow_ended(self, transit: IPAddress, now: float) -> None:
        a = self._by_transit.get(transit)
        if a is not None and a.active_flows > 0:
            a.active_flows -= 1
            a.last_flow_end = now

    def expired(self, now: float) -> list[Assignment]:
        """Assignments whose expiry has passed, oldest first (nothing is changed)."""
        return [a for _, _, a in sorted(self._live_entries()) if a.expiry <= now]

    def reclaim(self, now: float) -> list[Assignment]:
        """Remove expired assignments no flow needs; returns them (oldest first).

        An expired one with an active flow, or whose last flow ended within
        FLOW_GRACE, moves EXTEND on instead.
        """
        removed: list[Assignment] = []
        while self._heap and self._heap[0][0] <= now:
            expiry, _, magic = heapq.heappop(self._heap)
            a = self._by_magic.get(magic)
            if a is None or a.expiry != expiry:
                continue  # stale heap entry
            recent = a.last_flow_end is not None and now - a.last_flow_end <= FLOW_GRACE
            if a.active_flows > 0 or recent:
                self._set_expiry(a, now + EXTEND)
                continue
            self._remove(a)
            removed.append(a)
            if self.on_reclaim is not None:
                self.on_reclaim(a)
        return removed

    # -- persistence -------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Every assignment as JSON (see :meth:`restore`); costs O(changes since the last)."""
        for magic in self._stale:
            a = self._by_magic.get(magic)
            if a is None:
                self._rows.pop(magic, None)
            else:
                self._rows[magic] = msgspec.json.encode(_Saved(
                    str(a.magic), str(a.transit), str(a.real), a.app, a.domain, a.expiry,
                    a.connector))
        self._stale.clear()
        self._snapshotted = True
        return b"[" + b",".join(self._rows.values()) + b"]"

    @property
    def snapshot_changed(self) -> bool:
        """Whether :meth:`snapshot` may give other bytes than the last time (True before
        the first): a node that assigns nothing (a connector) need not write it again."""
        return not self._snapshotted or bool(self._stale)

    def restore(
        self,
        data: bytes,
        now: float,
        *,
        node_addresses: Iterable[IPAddress] = (),
        report: Callable[[str], None] | None = None,
    ) -> int:
        """Load a snapshot into an empty store; returns how many were restored.

        Flows do not survive a restart, so every restored assignment counts
        as if its last flow ended ``now``: none is reclaimed within the grace
        period while applications reconnect. ValueError on a bad snapshot;
        nothing is changed then.

        The file may come from another configuration (or be edited): an
        assignment whose magic IP is outside the current magic pools, whose
        transit IP is outside the current transit pools, or whose magic or
        transit IP is one of ``node_addresses`` (any tailnet node's) is left
        out, since routing it would capture that traffic; ``report`` gets one
        line for each, saying which addresses and why.
        """
        if self._by_magic:
            raise AssignmentError("restore needs an empty assignment store")
        try:
            saved = msgspec.json.decode(data, type=list[_Saved])
            parsed = [
                Assignment(
                    ipaddress.ip_address(s.magic), ipaddress.ip_address(s.transit),
                    ipaddress.ip_address(s.real), s.app, s.domain, s.expiry, s.connector,
                    last_flow_end=now,
                )
                for s in saved
            ]
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            raise ValueError(f"bad assignment snapshot: {e}") from None
        for a in parsed:
            if not (a.magic.version == a.transit.version == a.real.version):
                raise ValueError(f"bad assignment snapshot: mixed families in {a}")
        nodes = set(node_addresses)
        kept = []
        for a in parsed:
            reasons = self._unusable(a, nodes)
            if not reasons:
                kept.append(a)
            elif report is not None:
                report(
                    f"saved assignment dropped: magic {a.magic}, transit {a.transit} for "
                    f"{a.domain!r} {a.real} (app {a.app!r}): {'; '.join(reasons)}"
                )
        for a in kept:
            try:
                self.insert(a)
            except AssignmentError as e:
                self._clear()
                raise ValueError(f"bad assignment snapshot: {e}") from None
            self._magic[a.magic.version].mark_in_use(a.magic)
            self._transit[a.transit.version].mark_in_use(a.transit)
        return len(kept)

    def _unusable(self, a: Assignment, node_addresses: set[IPAddress]) -> list[str]:
        """Why a saved assignment cannot be used with the current pools and nodes (or none)."""
        v = a.magic.version
        reasons = []
        if a.magic not in self._pools.magic(v):
            reasons.append(f"magic IP outside the v{v} magic pool")
        if a.transit not in self._pools.transit(v):
            reasons.append(f"transit IP outside the v{v} transit pool")
        if a.magic in node_addresses:
            reasons.append("magic IP is a node's address")
        if a.transit in node_addresses:
            reasons.append("transit IP is a node's address")
        return reasons

    # -- internals -----------------------------------------------------------------

    def _live_entries(self) -> Iterator[tuple[float, int, Assignment]]:
        for expiry, seq, magic in self._heap:
            a = self._by_magic.get(magic)
            if a is not None and a.expiry == expiry:
                yield expiry, seq, a

    def _push(self, a: Assignment) -> None:
        heapq.heappush(self._heap, (a.expiry, next(self._seq), a.magic))

    def _set_expiry(self, a: Assignment, expiry: float) -> None:
        a.expiry = expiry
        self._stale.add(a.magic)
        self._push(a)
        if len(self._heap) > 4 * len(self._by_magic) + 64:
            self._heap = [(e, s, a.magic) for e, s, a in self._live_entries()]
            heapq.heapify(self._heap)

    def _remove(self, a: Assignment) -> None:
        del self._by_magic[a.magic]
        del self._by_transit[a.transit]
        del self._by_domain_real[(a.domain, a.real)]
        same = self._by_domain[a.domain]
        del same[a.real]
        if not same:
            del self._by_domain[a.domain]
        self._stale.add(a.magic)
        self._magic[a.magic.version].release(a.magic)
        self._transit[a.transit.version].release(a.transit)

    def _clear(self) -> None:
        for a in list(self._by_magic.values()):
            self._remove(a)
        self._heap.clear()
