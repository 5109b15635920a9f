"""Sans-IO limits for what untrusted senders can make a node do: token buckets,
per-source connection and request accounting, and log summaries.

Nothing here reads a clock: every decision takes ``now`` (seconds, any
monotonic base), so the rules are tested without sockets or sleeps.
:class:`conn25.daemon.refusals.RefusalLog` turns these decisions into counters and
rate-limited log lines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["LogSummary", "SourceAccounting", "SourceLimits", "TokenBucket"]

# A key that stands in for every new one once a table is full, so that a flood
# of distinct sources cannot grow memory (their events are still counted).
OTHER = "(other sources)"


class TokenBucket:
    """``burst`` events at once, then ``rate`` per second."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def level(self, now: float) -> float:
        return min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are that many; whether they were spent."""
        tokens = self.level(now)
        self.stamp = max(self.stamp, now)
        if tokens < n:
            self.tokens = tokens
            return False
        self.tokens = tokens - n
        return True

    def full(self, now: float) -> bool:
        return self.level(now) >= self.burst


@dataclass(frozen=True)
class SourceLimits:
    """What one source (an address) may hold and send; ``rate`` in requests per second."""

    max_connections: int = 16
    rate: float = 100.0
    burst: float = 200.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.rate <= 0 or self.burst < 1:
            raise ValueError(
                f"per-source limits need max_connections >= 1, rate > 0 and burst >= 1 "
                f"(got {self.max_connections}, {self.rate}, {self.burst})")


class SourceAccounting:
    """Open connections and request budget per source, so that one source at its
    maximum leaves every other source's budget untouched.

    Buckets of sources with no open connection are dropped once full again (a
    full bucket is what a new source gets anyway), which keeps the table as
    small as the set of sources that are active now.
    """

    def __init__(self, limits: SourceLimits, max_sources: int = 4096) -> None:
        self.limits = limits
        self.max_sources = max_sources
        self._open: Counter[Hashable] = Counter()
        self._buckets: dict[Hashable, TokenBucket] = {}

    def open(self, source: Hashable) -> bool:
        """A new connection from ``source``: whether it may be served (then call :meth:`close`)."""
        # (A Counter's missing key reads as 0 without being stored.)
        if self._open[source] >= self.limits.max_connections:
            return False
        self._open[source] += 1
        return True

    def close(self, source: Hashable) -> None:
        self._open[source] -= 1
        if self._open[source] <= 0:
            del self._open[source]

    def connections(self, source: Hashable) -> int:
        return self._open.get(source, 0)

    @property
    def tracked(self) -> int:
        """Sources with a request budget kept (at most ``max_sources``, plus the shared one)."""
        return len(self._buckets)

    def request(self, source: Hashable, now: float) -> bool:
        """A request from ``source``: whether its budget allows it."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._prune(now)
            if len(self._buckets) >= self.max_sources:
                source = OTHER  # every further new source shares one budget
                bucket = self._buckets.get(source)
            if bucket is None:
                bucket = self._buckets[source] = TokenBucket(
                    self.limits.rate, self.limits.burst, now)
        return bucket.take(now)

    def _prune(self, now: float) -> None:
        for source in [s for s, b in self._buckets.items()
                       if s not in self._open and b.full(now)]:
            del self._buckets[source]


class LogSummary:
    """Which of many like events get a log line.

    Per key (say (peer, reason)): the first event is logged; after that at
    most one line per ``interval`` seconds, which says how many events went
    unlogged since the previous line. :meth:`due` hands out the summaries of
    keys that went quiet, so the last burst is reported too.
    """

    def __init__(self, interval: float = 30.0, max_keys: int = 1024) -> None:
        if interval <= 0 or max_keys < 1:
            raise ValueError(f"LogSummary needs interval > 0 and max_keys >= 1 "
                             f"(got {interval}, {max_keys})")
        self.interval = interval
        self.max_keys = max_keys
        self._logged: dict[Hashable, float] = {}  # key -> time of its last line
        self._suppressed: Counter[Hashable] = Counter()

    def note(self, key: Hashable, now: float, count: int = 1) -> int | None:
        """``count`` events for ``key``: None to stay quiet, else log now; the int is how
        many earlier events of the key went unlogged (0 for the first line)."""
        last = self._logged.get(key)
        if last is None and len(self._logged) >= self.max_keys:
            self._forget(now)
            if len(self._logged) >= self.max_keys:
                key = OTHER
                last = self._logged.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] += count
            return None
        self._logged[key] = now
        # The events of this call beyond the one the line is about count as unlogged.
        return self._suppressed.pop(key, 0) + count - 1

    def due(self, now: float) -> list[tuple[Hashable, int]]:
        """(key, unlogged events) for each key whose interval passed with events unlogged."""
        out = []
        for key, n in list(self._suppressed.items()):
            if now - self._logged.get(key, now - self.interval) >= self.interval:
                out.append((key, n))
                del self._suppressed[key]
                self._logged[key] = now
        return out

    def _forget(self, now: float) -> None:
        for key in [k for k, t in self._logged.items()
                    if now - t >= self.interval and k not in self._suppressed]:
            del self._logged[key]
