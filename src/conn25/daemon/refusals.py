"""Refusals that a sender can cause at will, counted and logged as summaries.

The shell's side of :mod:`conn25.core.throttle`: it holds the logger and reads the
clock, and the decisions stay in :class:`conn25.core.throttle.LogSummary`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable

from ..core.throttle import LogSummary


class RefusalLog:
    """Refusals that a sender can cause at will: counted per reason, logged per
    (source, reason) as a summary at most every ``interval`` seconds.

    A flood of forged packets or refused items must not become a flood of log
    lines (disk, journald and the operator's attention are all finite): the
    first refusal of a kind from a source is logged as it happens, later ones
    as "N more". Call :meth:`flush` now and then to report the tail of a burst.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 30.0,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.level = level
        self.clock = clock
        self.summary = LogSummary(interval)
        self.counters: Counter[str] = Counter()
        self._latest: dict[Hashable, tuple[str, int]] = {}  # key -> (detail, level)

    def refuse(self, source: str, reason: str, detail: str, count: int = 1,
               level: int | None = None) -> None:
        """``count`` refusals of kind ``reason`` (a counter name) from ``source``."""
        if count <= 0:
            return
        level = self.level if level is None else level
        self.counters[reason] += count
        key = (source, reason)
        unlogged = self.summary.note(key, self.clock(), count)
        if unlogged is None:
            self._latest[key] = (detail, level)
            if len(self._latest) > self.summary.max_keys:
                self._latest.pop(next(iter(self._latest)))
            return
        self._latest.pop(key, None)
        if unlogged:
            self.logger.log(level, "%s from %s: %s (and %d more like it)",
                            reason, source, detail, unlogged)
        else:
            self.logger.log(level, "%s from %s: %s", reason, source, detail)

    def flush(self) -> None:
        """Log the summaries of bursts that ended."""
        interval = self.summary.interval
        for key, n in self.summary.due(self.clock()):
            source, reason = key if isinstance(key, tuple) else (key, "(several reasons)")
            latest, level = self._latest.pop(key, ("", self.level))
            self.logger.log(level, "%s from %s: %d more in the last %gs%s",
                            reason, source, n, interval, f" (latest: {latest})" if latest else "")
