"""Handshakes per source address under load: a token bucket per address, as WireGuard keeps
one, so a flood from one place cannot crowd out everyone else's handshakes."""

from __future__ import annotations

from ..throttle import SourceAccounting, SourceLimits

HANDSHAKES_PER_SECOND = 20.0
BURST = 5.0
MAX_SOURCES = 1 << 16


class HandshakeRateLimiter:
    """The per-source budget of the peer API's limits, applied to handshakes."""

    def __init__(self, rate: float = HANDSHAKES_PER_SECOND, burst: float = BURST,
                 max_sources: int = MAX_SOURCES) -> None:
        # Handshakes open no connection: only the request budget is used.
        self._sources = SourceAccounting(SourceLimits(rate=rate, burst=burst), max_sources)

    def __len__(self) -> int:
        return self._sources.tracked

    def allow(self, source: bytes, now: float) -> bool:
        """Take one token of `source`'s bucket; False if it is empty."""
        return self._sources.request(source, now)
