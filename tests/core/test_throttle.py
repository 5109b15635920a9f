"""The sans-IO limits (conn25.core.throttle): token buckets, per-source accounting, log
summaries."""

from __future__ import annotations

import logging

import pytest

from conn25.core.throttle import LogSummary, SourceAccounting, SourceLimits, TokenBucket
from conn25.daemon.refusals import RefusalLog


def test_token_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(0.05)  # half a token
    assert b.take(0.1)
    assert not b.take(0.1)
    assert b.full(10.0) and b.level(10.0) == 5  # never above the burst


def test_token_bucket_ignores_a_clock_going_back():
    b = TokenBucket(rate=1, burst=1, now=100.0)
    assert b.take(100.0)
    assert not b.take(50.0)
    assert not b.take(100.5)
    assert b.take(101.0)


@pytest.mark.parametrize("args", [(0, 1), (1, 0.5), (-1, 5)])
def test_token_bucket_rejects_bad_parameters(args):
    with pytest.raises(ValueError):
        TokenBucket(*args, now=0.0)


def test_one_source_at_its_connection_limit_leaves_others_alone():
    acc = SourceAccounting(SourceLimits(max_connections=3))
    assert [acc.open("a") for _ in range(4)] == [True, True, True, False]
    assert acc.open("b")
    assert acc.connections("a") == 3 and acc.connections("b") == 1
    acc.close("a")
    assert acc.open("a")
    assert not acc.open("a")
    for _ in range(3):
        acc.close("a")
    assert acc.connections("a") == 0


def test_one_source_out_of_requests_leaves_others_their_budget():
    acc = SourceAccounting(SourceLimits(rate=1, burst=10))
    assert sum(acc.request("a", 0.0) for _ in range(100)) == 10
    assert sum(acc.request("b", 0.0) for _ in range(100)) == 10
    assert acc.request("a", 1.0) and not acc.request("a", 1.0)


def test_a_flood_of_new_sources_shares_one_budget_once_the_table_is_full():
    acc = SourceAccounting(SourceLimits(rate=1, burst=2), max_sources=4)
    for i in range(4):
        acc.open(i)  # active: cannot be pruned
        assert acc.request(i, 0.0)
    granted = sum(acc.request(f"new{i}", 0.0) for i in range(100))
    assert granted == 2  # the shared bucket's burst
    assert len(acc._buckets) == 5


def test_idle_sources_with_full_buckets_are_pruned():
    acc = SourceAccounting(SourceLimits(rate=1, burst=2), max_sources=4)
    for i in range(4):
        assert acc.request(i, 0.0)
    # At t=10 every bucket is full again and no source has a connection: room for all.
    assert all(acc.request(f"new{i}", 10.0) for i in range(4))
    assert len(acc._buckets) == 4


def test_log_summary_logs_the_first_then_one_line_per_interval():
    s = LogSummary(interval=10)
    assert s.note("k", 0.0) == 0
    assert [s.note("k", t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert s.note("other", 5.0) == 0  # keys are independent
    assert s.note("k", 10.0) == 3  # three went unlogged
    assert s.note("k", 11.0) is None
    assert s.due(15.0) == []  # interval not over
    assert s.due(20.0) == [("k", 1)]
    assert s.due(40.0) == []  # nothing left
    assert s.note("k", 40.0) == 0


def test_log_summary_counts_a_batch_as_many_events():
    s = LogSummary(interval=10)
    assert s.note("k", 0.0, count=12000) == 11999
    assert s.note("k", 1.0, count=500) is None
    assert s.due(10.0) == [("k", 500)]


def test_log_summary_bounds_its_keys():
    s = LogSummary(interval=10, max_keys=3)
    assert [s.note(i, 0.0) for i in range(3)] == [0, 0, 0]
    assert s.note("x", 1.0) == 0  # the overflow key
    assert s.note("y", 1.0) is None  # shares it
    assert len(s._logged) == 4
    assert s.note("z", 20.0) == 0  # old keys are forgotten after their interval
    assert "z" in s._logged


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_refusal_log_counts_everything_and_logs_summaries():
    logger = logging.getLogger("test.throttle")
    logger.setLevel(logging.INFO)
    handler = _Lines()
    logger.addHandler(handler)
    now = [0.0]
    try:
        r = RefusalLog(logger, interval=30, clock=lambda: now[0])
        for i in range(20000):
            r.refuse("bob", "reject_received", f"transit 169.254.128.{i % 250}")
        r.refuse("bob", "transit_item", "code 6", count=12000)
        assert r.counters == {"reject_received": 20000, "transit_item": 12000}
        assert len(handler.lines) == 2
        assert handler.lines[1].endswith("(and 11999 more like it)")
        now[0] = 31.0
        r.flush()
        assert len(handler.lines) == 3
        assert "19999 more in the last 30s" in handler.lines[2]
        assert "latest: transit 169.254.128." in handler.lines[2]
        r.flush()
        assert len(handler.lines) == 3
    finally:
        logger.removeHandler(handler)
