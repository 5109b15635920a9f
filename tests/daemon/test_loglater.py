"""LaterLog: lines an answer need not wait for are logged once the logging task yields."""

import logging

import pytest
import trio
import trio.testing

from conn25.daemon.loglater import LaterLog

log = logging.getLogger("conn25.test.loglater")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name]


def test_without_run_lines_are_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    later = LaterLog()
    later.log(log, logging.INFO, "mapped %s -> %s", "a", 1)
    assert lines(caplog) == ["mapped a -> 1"]


def test_lines_wait_for_the_logging_task_to_yield(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    later = LaterLog()
    formatted: list[str] = []

    class Arg:  # formatted when the line is logged, not when it is queued
        def __str__(self) -> str:
            formatted.append("now")
            return "x"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(later.run)
            later.log(log, logging.INFO, "first %s", Arg())
            later.log(log, logging.DEBUG, "below the level %s", Arg())
            later.log(log, logging.WARNING, "second")
            assert formatted == [] and lines(caplog) == []  # this task has not yielded yet
            await trio.testing.wait_all_tasks_blocked()
            assert formatted  # by the handler, once the line was logged
            assert lines(caplog) == ["first x", "second"]
            later.log(log, logging.INFO, "at the end")
            nursery.cancel_scope.cancel()  # what is still queued goes out as run() ends
        assert lines(caplog) == ["first x", "second", "at the end"]
        later.log(log, logging.INFO, "after run")  # not running any more: at once
        assert lines(caplog)[-1] == "after run"

    trio.run(main)
