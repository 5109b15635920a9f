"""Requests to one server, gathered into a few exchanges when many wait at once.

A burst of fresh names (a browser starting up asks thousands at once) would
cost one HTTP exchange each; the exchange, not the name, is most of the work
on both ends. :class:`Batcher` lets at most ``max_inflight`` exchanges out
at a time, and whatever queued up meanwhile goes in the next one, up to
``max_batch`` items. A lone item goes out at once, so an unhurried query
waits for nothing.

No task of its own: whoever submits an item while an exchange may start
sends the next batch itself and hands out the results; the others wait for
theirs. That exchange is shielded from its sender's cancellation (its items
are other callers' too); ``send`` must bound its own time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

__all__ = ["Batcher"]

_I = TypeVar("_I")
_R = TypeVar("_R")


class _Slot(Generic[_I, _R]):
    __slots__ = ("error", "item", "queued", "result", "settled", "wake")

    def __init__(self, item: _I) -> None:
        self.item = item
        self.result: _R | None = None
        self.error: BaseException | None = None
        self.queued = True  # not taken into an exchange yet
        self.settled = False
        # Set when the item is settled, or when its submitter is to send the next batch:
        # one event per item, so an exchange that ends wakes only those it concerns.
        self.wake = trio.Event()


class Batcher(Generic[_I, _R]):
    """``send(items)`` returns one result per item, in order, or raises for them all."""

    def __init__(self, send: Callable[[list[_I]], Awaitable[Sequence[_R]]], *,
                 max_batch: int, max_inflight: int) -> None:
        self._send = send
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._queue: list[_Slot[_I, _R]] = []
        self._inflight = 0
        self.counters = {"items": 0, "exchanges": 0}

    async def submit(self, item: _I) -> _R:
        """The result for ``item``; raises what its exchange raised."""
        slot: _Slot[_I, _R] = _Slot(item)
        self._queue.append(slot)
        self.counters["items"] += 1
        try:
            while not slot.settled:
                if slot.queued and self._inflight < self.max_inflight:
                    await self._exchange()
                else:
                    slot.wake = trio.Event()
                    await slot.wake.wait()
        finally:
            if slot.queued:
                self._queue.remove(slot)  # cancelled while it waited: nobody needs it sent
                self._next_turn()
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None  # settled without an error
        return slot.result

    def _next_turn(self) -> None:
        """Wake the first waiting item's submitter to send the next batch, if one may go."""
        if self._queue and self._inflight < self.max_inflight:
            self._queue[0].wake.set()

    async def _exchange(self) -> None:
        batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        for s in batch:
            s.queued = False
        self._inflight += 1
        self.counters["exchanges"] += 1
        self._next_turn()  # more may go at once: the next waiting submitter sends them
        try:
            with trio.CancelScope(shield=True):
                try:
                    results = list(await self._send([s.item for s in batch]))
                    if len(results) != len(batch):
                        raise ValueError(f"{len(results)} results for {len(batch)} items")
                except Exception as e:
                    for s in batch:
                        s.error = e
                else:
                    for s, r in zip(batch, results, strict=True):
                        s.result = r
        finally:
            self._inflight -= 1
            for s in batch:
                s.settled = True
                s.wake.set()
            self._next_turn()
