"""Log lines with a timestamp on a terminal or file, without one (and with a syslog
priority) when stderr is the journal stream $JOURNAL_STREAM names."""

from __future__ import annotations

import logging
import os
import re

from conn25.daemon.logsetup import PLAIN_FORMAT, JournalFormatter, is_journal


def stream_id(f) -> str:
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_the_journal_is_recognised_by_device_and_inode(tmp_path):
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        assert is_journal(a, {"JOURNAL_STREAM": stream_id(a)})
        # Inherited by a process whose stderr went elsewhere: not its stream.
        assert not is_journal(b, {"JOURNAL_STREAM": stream_id(a)})
        assert not is_journal(a, {})
        assert not is_journal(a, {"JOURNAL_STREAM": "garbage"})


def record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("conn25d", level, __file__, 1, msg, None, None)


def test_journal_lines_carry_the_priority_and_no_timestamp():
    f = JournalFormatter()
    assert f.format(record(logging.INFO, "node up")) == "<6>conn25d INFO node up"
    assert f.format(record(logging.WARNING, "w")).startswith("<4>")
    assert f.format(record(logging.ERROR, "e")).startswith("<3>")
    assert f.format(record(logging.CRITICAL, "c")).startswith("<2>")
    assert f.format(record(logging.DEBUG, "d")).startswith("<7>")
    # Every line is an entry of its own: a rejected file's list of errors stays an error.
    assert f.format(record(logging.ERROR, "rejected:\na: bad\nb: bad")) == \
        "<3>conn25d ERROR rejected:\n<3>a: bad\n<3>b: bad"


def test_other_lines_carry_a_timestamp():
    line = logging.Formatter(PLAIN_FORMAT).format(record(logging.INFO, "node up"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} conn25d INFO node up", line)
