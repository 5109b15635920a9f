"""Handshakes per source address under load: a token bucket per address, as WireGuard keeps
one, so a flood from one place cannot crowd out everyone else's handshakes."""

from __future__ import annotations

HANDSHAKES_PER_SECOND = 20.0
BURST = 5.0
MAX_SOURCES = 1 << 16


class HandshakeRateLimiter:
    def __init__(self, rate: float = HANDSHAKES_PER_SECOND, burst: float = BURST,
                 max_sources: int = MAX_SOURCES) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: dict[bytes, tuple[float, float]] = {}  # source -> (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: bytes, now: float) -> bool:
        """Take one token of `source`'s bucket; False if it is empty."""
        entry = self._buckets.get(source)
        if entry is None:
            if len(self._buckets) >= self.max_sources:
                self._forget_full(now)
                if len(self._buckets) >= self.max_sources:
                    return False  # too many sources at once: refuse newcomers, keep the known
            tokens = self.burst
        else:
            tokens, then = entry
            tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1, now)
        return True

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket.
        refill = self.burst / self.rate
        for source in [s for s, (_, then) in self._buckets.items() if now - then >= refill]:
            del self._buckets[source]
