"""The service manager's notification protocol (systemd's sd_notify), for a node that
runs as a ``Type=notify`` unit.

The service manager passes ``$NOTIFY_SOCKET``, the address of a unix datagram socket
(a path, or an abstract name written with a leading ``@``); the service sends it
datagrams of newline-separated ``KEY=VALUE`` lines: ``READY=1`` once it serves,
``RELOADING=1`` ... ``READY=1`` around a reload, ``STOPPING=1`` when it starts to stop,
and ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the unit has
``WatchdogSec=`` (``$WATCHDOG_PID``, when set, names the process meant).

Without ``$NOTIFY_SOCKET`` every call does nothing, so the node runs the same outside
systemd. A message that cannot be sent is logged, never raised: the service manager's
trouble must not stop the node.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("conn25d.sdnotify")


def socket_address(value: str) -> str | bytes | None:
    """The ``connect`` address of a ``$NOTIFY_SOCKET`` value; None for one that is
    neither an absolute path nor an abstract name (``@name``)."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings (half the manager's timeout, as systemd
    advises), or None when no watchdog is asked of process ``pid``."""
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """Sends notifications to one service manager socket (or nowhere)."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog if address is not None else None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     pid: int | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract name", raw)
        return cls(address, watchdog_interval(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``lines``; whether it was sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # Never wait on the manager: a full queue drops this one message.
                s.setblocking(False)
                s.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            if not self._failed:  # once: a manager gone away would otherwise fill the log
                log.warning("cannot notify the service manager at %r: %s", self.address,
                            e.strerror or e)
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets a manager tell this reload from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")
