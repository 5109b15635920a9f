"""pyroute2's IPRoute in a short-lived helper process.

The node changes links, addresses and routes only at start, reload and stop,
yet importing pyroute2 costs the resident process about 6 MiB (pyroute2
brings asyncio, multiprocessing and unittest with it). So those calls go to a
child process (``python -m conn25.daemon.netlink_helper``) that lives for one
group of calls: :class:`Netlink` starts it, forwards each IPRoute method call
over a pipe as a JSON line, and ends it on ``close``. A child whose parent
died sees its stdin close and exits.

What crosses the pipe is plain data: the call (method, arguments) one way;
the result, with pyroute2's messages turned into :class:`Message` (``msg["index"]``,
``msg.get_attr(NAME)``), or the error (:class:`NetlinkError` with the kernel's
errno, OSError, ValueError) the other way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import IO, Any

_MODULE = "conn25.daemon.netlink_helper"
_STOP_WAIT = 5.0  # seconds for the child to exit after its stdin closed


class NetlinkError(Exception):
    """The kernel refused a netlink request; ``code`` is its errno."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))
        self.code = code


class Message(dict[str, Any]):
    """A netlink message or attribute set as the helper sent it: its fields by
    key, its attributes (``attrs``, [name, value] pairs) by :meth:`get_attr`."""

    def get_attr(self, name: str, default: Any = None) -> Any:
        for key, value in self.get("attrs", ()):
            if key == name:
                return Message(value) if isinstance(value, dict) else value
        return default


class Netlink:
    """IPRoute's methods (``link_lookup``, ``link``, ``addr``, ``route``,
    ``get_rules``), each run by the helper process. A context manager; the
    child starts on the first call."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def link_lookup(self, **kwargs: Any) -> list[int]:
        return list(self._call("link_lookup", (), kwargs))

    def link(self, command: str, **kwargs: Any) -> list[Message]:
        return self._messages(self._call("link", (command,), kwargs))

    def addr(self, command: str, **kwargs: Any) -> list[Message]:
        return self._messages(self._call("addr", (command,), kwargs))

    def route(self, command: str, **kwargs: Any) -> list[Message]:
        return self._messages(self._call("route", (command,), kwargs))

    def get_rules(self, **kwargs: Any) -> list[Message]:
        return self._messages(self._call("get_rules", (), kwargs))

    @staticmethod
    def _messages(result: Any) -> list[Message]:
        return [Message(m) for m in result or ()]

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        proc = self._proc or self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps([method, args, kwargs]).encode() + b"\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except OSError:
            line = b""
        if not line:
            raise OSError(f"the netlink helper ({_MODULE}) ended: {self._end()}")
        reply = json.loads(line)
        if "ok" in reply:
            return reply["ok"]
        kind, code, message = reply["error"]
        if kind == "netlink":
            raise NetlinkError(code, message)
        if kind == "os":
            raise OSError(code, message)
        raise ValueError(message)

    def _start(self) -> subprocess.Popen[bytes]:
        # The child imports conn25 from where this process found it, even when
        # an embedding program put it on sys.path itself.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, close_fds=True)
        return self._proc

    def _end(self) -> str:
        """Wait for the child after its pipe broke; what it said on stderr."""
        proc, self._proc = self._proc, None
        assert proc is not None
        try:
            _, err = proc.communicate(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        lines = err.decode(errors="replace").strip().splitlines()
        return f"exit status {proc.returncode}" + (f", {lines[-1]}" if lines else "")

    def close(self) -> None:
        """End the child (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.communicate(timeout=_STOP_WAIT)  # closes its stdin: it exits
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


# -- the child ------------------------------------------------------------------

_METHODS = frozenset({"link_lookup", "link", "addr", "route", "get_rules"})


def _plain(value: Any) -> Any:
    """pyroute2's results as JSON data (messages without their headers)."""
    if hasattr(value, "dump"):
        value = value.dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "header"}
    if isinstance(value, (list, tuple, Iterator)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    from .netlink import IPRoute
    from .netlink import NetlinkError as PyrouteError

    with IPRoute() as ipr:
        for line in requests:
            method, args, kwargs = json.loads(line)
            try:
                if method not in _METHODS:
                    raise ValueError(f"netlink helper: no method {method!r}")
                reply: dict[str, Any] = {"ok": _plain(getattr(ipr, method)(*args, **kwargs))}
            except PyrouteError as e:
                reply = {"error": ["netlink", e.code, os.strerror(e.code)]}
            except OSError as e:
                reply = {"error": ["os", e.errno or 0, e.strerror or str(e)]}
            except (ValueError, TypeError, KeyError) as e:
                reply = {"error": ["value", 0, str(e)]}
            replies.write(json.dumps(reply).encode() + b"\n")
            replies.flush()


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
