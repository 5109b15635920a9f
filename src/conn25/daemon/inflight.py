"""Identical questions in flight, answered once.

A DNS question asked again while it is still being answered (a stub
resolver's retry, two applications starting together) waits for the answer
under way instead of costing the upstream, or the connector, a second one.
Used by the forwarder and by the client's app resolver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

__all__ = ["Coalescer"]


@dataclass
class _InFlight:
    done: trio.Event = field(default_factory=trio.Event)
    answer: bytes | None = None


class Coalescer:
    """One ``produce()`` per key at a time; the others asking meanwhile share its answer."""

    def __init__(self) -> None:
        self._pending: dict[bytes, _InFlight] = {}

    async def answer(self, key: bytes | None, produce: Callable[[], Awaitable[bytes]],
                     wait: float) -> tuple[bytes | None, bool]:
        """(the answer, whether it was another's): ``produce()``'s when nothing with
        ``key`` is in flight (or ``key`` is None), else the one in flight's, waited for
        at most ``wait`` seconds (None when it got none in that time, or failed)."""
        if key is None:
            return await produce(), False
        pending = self._pending.get(key)
        if pending is not None:
            with trio.move_on_after(wait):
                await pending.done.wait()
            return pending.answer, True
        pending = self._pending[key] = _InFlight()
        try:
            pending.answer = await produce()
            return pending.answer, False
        finally:
            del self._pending[key]
            pending.done.set()
