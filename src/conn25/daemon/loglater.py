"""Log lines that an answer need not wait for.

A fresh app name costs the client a line ("answered ...") and the connector one per
mapping ("mapped ..."); making, formatting and writing a log record costs tens of µs,
which the DNS answer or the peer API response would otherwise wait for. A
:class:`LaterLog` takes such a line (its logger, level, message and arguments, which
are formatted only then) and hands it to ``logging`` from a task of its own. trio runs
that task once the task that logged yields, which a reply's send does only after the
reply is out. While :meth:`LaterLog.run` is not running (before it starts, after it
ends, or in a test without it), lines are logged at once.
"""

from __future__ import annotations

import logging

import trio

__all__ = ["LaterLog"]


class LaterLog:
    """Lines queued by :meth:`log`, logged by :meth:`run` at its next turn."""

    def __init__(self) -> None:
        self._lines: list[tuple[logging.Logger, int, str, tuple[object, ...]]] = []
        self._wake: trio.Event | None = None  # set while run() runs

    def log(self, logger: logging.Logger, level: int, msg: str, *args: object) -> None:
        """``logger.log(level, msg, *args)``, soon (at once while :meth:`run` is not running)."""
        if not logger.isEnabledFor(level):
            return
        if self._wake is None:
            logger.log(level, msg, *args)
            return
        self._lines.append((logger, level, msg, args))
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Log what is queued whenever something is, until cancelled (then the rest)."""
        try:
            self._wake = trio.Event()
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                self._flush()
        finally:
            self._wake = None
            self._flush()

    def _flush(self) -> None:
        lines, self._lines = self._lines, []
        for logger, level, msg, args in lines:
            logger.log(level, msg, *args)
