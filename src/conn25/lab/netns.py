"""Throwaway network namespaces for the tests, the benchmarks and `conn25d demo`.

Everything here uses only documentation, reserved and overlay addresses and
gives the namespaces no route to the host's network (they are joined only by
veth pairs between each other).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

_seq = itertools.count()
_T = TypeVar("_T")
CLONE_NEWNET = 0x40000000


def need_root() -> str | None:
    """Why the root tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


class Netns:
    def __init__(self, role: str) -> None:
        self.name = f"c25t{os.getpid() % 100000}{role[:4]}{next(_seq)}"
        sh("ip", "netns", "add", self.name)
        self.procs: list[subprocess.Popen] = []
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *args: str, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *args, check=check, timeout=timeout)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def call(self, fn: Callable[[], _T], timeout: float = 10) -> _T:
        """fn() run inside this namespace, by a short-lived thread that enters it: setns
        changes only the calling thread, and a socket fn makes keeps the namespace it was
        made in after the thread is gone. fn's exception is raised here."""
        done: list[tuple[bool, object]] = []

        def enter() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise OSError(errno, f"setns: {os.strerror(errno)}")
                finally:
                    os.close(fd)
                done.append((True, fn()))
            except BaseException as e:
                done.append((False, e))

        t = threading.Thread(target=enter, name=f"in {self.name}")
        t.start()
        t.join(timeout)
        if not done:
            raise TimeoutError(f"the call in {self} did not finish within {timeout}s")
        ok, value = done[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def close(self) -> None:
        for p in self.procs:
            terminate(p)
        # Deleting the namespace removes its veth ends, TUN devices and routes.
        sh("ip", "netns", "delete", self.name, check=False)

    def exists(self) -> bool:
        return self.name in sh("ip", "netns", "list").stdout.split()

    def __repr__(self) -> str:
        return f"Netns({self.name})"


def terminate(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5) -> int:
    """Stop a process we started (by its PID): `sig`, then SIGKILL after `timeout`; its status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def link(a: Netns, a_addr: str, b: Netns, b_addr: str) -> None:
    """A veth pair between two namespaces, with one address (prefix given) at each end."""
    ia, ib = f"v{next(_seq)}a", f"v{next(_seq)}b"
    sh("ip", "link", "add", ia, "netns", a.name, "type", "veth", "peer", "name", ib,
       "netns", b.name)
    for ns, ifname, addr in ((a, ia, a_addr), (b, ib, b_addr)):
        ns.run("ip", "addr", "add", addr, "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")


def wait_for(cond: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> object:
    """Poll `cond` until it returns a true value; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def quote(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)
