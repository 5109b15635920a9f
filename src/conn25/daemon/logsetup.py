"""How ``conn25d up`` logs: lines on stderr with a timestamp of their own or, when stderr
is systemd's journal, without one (the journal stamps every line) and with the line's
syslog priority as a ``<N>`` prefix, which the journal turns into the entry's priority
(``journalctl -p warning`` then finds warnings and worse).

systemd says stderr is the journal by setting ``$JOURNAL_STREAM`` to the stream's
``DEVICE:INODE``; a child whose stderr was redirected elsewhere inherits the variable
but not the stream, so the pair is checked against stderr itself.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(name)s %(levelname)s %(message)s"
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
             (logging.INFO, 6))  # else debug, 7


def is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journal stream ``$JOURNAL_STREAM`` names."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError):  # unset or malformed, or a stream without a descriptor
        return False


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
        # The journal makes an entry of every line: each carries the priority.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def configure(level: str, stream: TextIO | None = None,
              environ: Mapping[str, str] | None = None) -> None:
    """Log records of ``level`` ("debug", "info", ...) and above to ``stream`` (stderr)."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    journal = is_journal(stream, os.environ if environ is None else environ)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug is per netlink message
