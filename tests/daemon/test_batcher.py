"""The request batcher: a burst shares exchanges, a lone item goes at once, failures and
cancellations reach exactly the items they concern."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from conn25.daemon.batcher import Batcher


class Server:
    def __init__(self) -> None:
        self.sent: list[list[int]] = []
        self.gate: trio.Event | None = None
        self.fail: Exception | None = None
        self.short = False

    async def send(self, items: list[int]) -> list[int]:
        self.sent.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(1)
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items][: len(items) - self.short]


def run(fn):
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_lone_item_goes_at_once_and_a_burst_waits_for_a_free_exchange():
    server = Server()
    batcher = Batcher(server.send, max_batch=3, max_inflight=1)
    got: dict[int, int] = {}

    async def main():
        got[0] = await batcher.submit(0)
        assert server.sent == [[0]]
        async with trio.open_nursery() as nursery:
            for i in range(1, 8):
                async def one(i=i):
                    got[i] = await batcher.submit(i)
                nursery.start_soon(one)

    run(main)
    assert got == {i: i * 10 for i in range(8)}
    # (trio starts tasks in no promised order: which items share is not fixed, how many is)
    assert server.sent[0] == [0] and [len(b) for b in server.sent] == [1, 1, 3, 3]
    assert sorted(i for b in server.sent for i in b) == list(range(8))
    assert batcher.counters == {"items": 8, "exchanges": 4}


@pytest.mark.parametrize("failure", ["raises", "short"])
def test_a_failed_exchange_fails_each_of_its_items_and_no_other(failure):
    server = Server()
    batcher = Batcher(server.send, max_batch=2, max_inflight=1)
    outcome: dict[int, object] = {}

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(3):
                async def one(i=i):
                    try:
                        outcome[i] = await batcher.submit(i)
                    except Exception as e:
                        outcome[i] = type(e)
                nursery.start_soon(one)
                if i == 0:
                    await trio.testing.wait_all_tasks_blocked()
                    server.fail = OSError("down") if failure == "raises" else None
                    server.short = failure == "short"
            await trio.sleep(1.5)  # the first exchange is over; the second under way
            server.fail, server.short = None, False

    run(main)
    error = OSError if failure == "raises" else ValueError
    assert outcome == {0: error, 1: 10, 2: 20}
    assert server.sent[0] == [0] and sorted(server.sent[1]) == [1, 2] and len(server.sent) == 2


def test_a_cancelled_waiter_is_not_sent_and_a_cancelled_sender_still_delivers_the_others():
    server = Server()
    server.gate = trio.Event()
    batcher = Batcher(server.send, max_batch=4, max_inflight=1)
    got: dict[int, int] = {}

    async def main():
        async with trio.open_nursery() as nursery:
            leader = trio.CancelScope()
            waiter = trio.CancelScope()

            async def first():
                with leader:
                    got[0] = await batcher.submit(0)

            async def gone():
                with waiter:
                    got[1] = await batcher.submit(1)

            async def stays():
                got[2] = await batcher.submit(2)

            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(gone)
            nursery.start_soon(stays)
            await trio.testing.wait_all_tasks_blocked()
            waiter.cancel()  # still queued: dropped
            await trio.testing.wait_all_tasks_blocked()
            leader.cancel()  # its exchange is under way: it finishes for everyone in it
            server.gate.set()

    run(main)
    assert server.sent == [[0], [2]]
    assert got == {0: 0, 2: 20}


def test_queued_items_fill_every_free_exchange_and_wake_only_when_their_turn_or_result_comes():
    """Items go out at once while an exchange is free; the rest wait and share full
    batches. An exchange that ends wakes its own items and the next waiting senders only
    (a burst of thousands of waiters must not all wake for every exchange)."""
    server = Server()
    server.gate = trio.Event()
    batcher = Batcher(server.send, max_batch=4, max_inflight=3)
    woken = {"n": 0}
    real_wait = trio.Event.wait

    async def counting_wait(self):
        await real_wait(self)
        woken["n"] += 1

    sizes: list[int] = []

    async def main():
        nonlocal sizes
        trio.Event.wait = counting_wait  # type: ignore[method-assign]
        try:
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(batcher.submit, i)
                await trio.testing.wait_all_tasks_blocked()
                sizes = [len(b) for b in server.sent]
                server.gate.set()  # before any assertion: the exchanges are shielded
        finally:
            trio.Event.wait = real_wait  # type: ignore[method-assign]

    run(main)
    assert sizes == [1, 1, 1]  # the first three went at once, alone; 37 wait
    assert [len(b) for b in server.sent[3:]] == [4] * 9 + [1]
    assert sorted(i for b in server.sent for i in b) == list(range(40))
    # Each item wakes about once for its result and at most once for its turn to send.
    assert woken["n"] <= 2 * 40
