"""An address pool of one family: round-robin over its ranges, skipping addresses in use.

Handing addresses out round-robin (rather than lowest-free-first) keeps a
just-returned magic or transit IP out of circulation for as long as
possible, so a stale DNS cache entry or a late packet is unlikely to hit an
address that now means something else.
"""

from __future__ import annotations

from .iprange import IPAddress, IPSet, make_address

# Capacity is reported as a bounded integer (the status API and metrics carry
# it), so huge IPv6 pools saturate here instead of printing 2**64.
MAX_CAPACITY = 2**63 - 1


class PoolExhausted(Exception):
    """Every address of the pool is in use."""


class PoolError(ValueError):
    """An address returned to a pool that cannot take it back."""


class IPPool:
    def __init__(self, ranges: IPSet | None = None) -> None:
        self._set = IPSet()
        # (version, int) of everything handed out -> whether it lies in the current set
        self._in_use: dict[tuple[int, int], bool] = {}
        self._in_set = 0  # how many of _in_use lie in the current set
        self._size = 0  # of the current set
        self._range = 0  # walk position: index into _set.ranges ...
        self._offset = 0  # ... and offset within that range
        if ranges is not None:
            self.reconfigure(ranges)

    @property
    def ranges(self) -> IPSet:
        return self._set

    @property
    def capacity(self) -> int:
        return min(self._size, MAX_CAPACITY)

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def reconfigure(self, ranges: IPSet) -> None:
        """Use a new set of ranges.

        The same set keeps the walk position. A different set starts at its
        first address; addresses in use from the old set stay in use until
        returned and, lying outside the new set, are never handed out again.
        """
        if ranges == self._set:
            return
        self._set = ranges
        self._range = self._offset = 0
        self._size = ranges.size()
        for key in self._in_use:
            self._in_use[key] = self._contains(*key)
        self._in_set = sum(self._in_use.values())

    def next(self) -> IPAddress:
        """The next free address in walk order; PoolExhausted when there is none."""
        ranges = self._set.ranges
        if not ranges or self._in_set >= self._size:
            raise PoolExhausted(f"pool exhausted ({self._set or 'no ranges'})")
        while True:
            r = ranges[self._range]
            value = r.first + self._offset
            self._offset += 1
            if value >= r.last:
                self._range = (self._range + 1) % len(ranges)
                self._offset = 0
            key = (r.version, value)
            if key not in self._in_use:
                self._in_use[key] = True
                self._in_set += 1
                return make_address(r.version, value)

    def mark_in_use(self, addr: IPAddress) -> None:
        """Take ``addr`` out of circulation (restoring saved state). Idempotent."""
        key = (addr.version, int(addr))
        if key not in self._in_use:
            inside = self._in_use[key] = self._contains(*key)
            self._in_set += inside

    def release(self, addr: IPAddress) -> None:
        """Return ``addr``; PoolError if it is not the pool's or not in use."""
        key = (addr.version, int(addr))
        if key in self._in_use:
            self._in_set -= self._in_use.pop(key)
        elif self._contains(*key):
            raise PoolError(f"{addr} returned to the pool but it is not in use")
        else:
            raise PoolError(f"{addr} does not belong to the pool ({self._set or 'no ranges'})")

    def _contains(self, version: int, value: int) -> bool:
        return make_address(version, value) in self._set
