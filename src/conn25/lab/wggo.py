"""wireguard-go, a WireGuard we did not write, as a device in a namespace of ours.

The tests run it against our implementation. It is configured only the stock way,
with `wg set` and `ip`, so what works here works with any WireGuard peer that is
given the tailnet file's keys. Debian's wireguard-go and wireguard-tools
(`install.sh --dev`) provide the two programs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from pathlib import Path

from ..daemon import keyfile
from .netns import Netns, terminate, wait_for

# wireguard-go's control sockets: one directory for every namespace (`ip netns exec`
# leaves /run shared), so device names must be unique on the machine, not only in
# their namespace.
SOCKETS = Path("/run/wireguard")
_seq = itertools.count()
# Logged once the control socket accepts connections (at LOG_LEVEL=debug or verbose).
READY = "UAPI listener started"


def wireguard_missing() -> str | None:
    """Why wireguard-go cannot run here, or None."""
    missing = [t for t in ("wireguard-go", "wg") if shutil.which(t) is None]
    if missing:
        return (f"{' and '.join(missing)} not on PATH: `install.sh --dev` installs "
                "Debian's wireguard-go and wireguard-tools")
    return None


class WireguardGo:
    """One wireguard-go device in `ns`, in the foreground so that we own the process
    (stopped by its PID in close(), or by the namespace's close()). Its debug log goes
    to `log`; `private_key` is written to `key_path` (mode 0600) for `wg set`."""

    def __init__(self, ns: Netns, log: Path, key_path: Path, private_key: bytes) -> None:
        self.ns = ns
        self.log = Path(log)
        self.ifname = f"c25wg{os.getpid() % 10000}x{next(_seq)}"
        self.key_path = Path(key_path)
        if not self.key_path.exists():
            keyfile.create(self.key_path, private_key)
        with self.log.open("wb") as out:
            self.proc = ns.popen("wireguard-go", "-f", self.ifname, stdout=out,
                                 stderr=subprocess.STDOUT,
                                 env={**os.environ, "WG_PROCESS_FOREGROUND": "1",
                                      "LOG_LEVEL": "debug"})
        try:
            # Its own word that the control socket is up, not `wg show`: wg unlinks a
            # socket that refuses a connection, as one does between wireguard-go's bind
            # and listen, and wireguard-go then exits when it cannot watch the socket.
            wait_for(lambda: self.proc.poll() is not None
                     or READY in self.log_text(), 10,
                     f"wireguard-go to create {self.ifname}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"wireguard-go {self.ifname} exited with "
                                   f"{self.proc.returncode}:\n{self.log_text()[-2000:]}")
            # Its private key, from the file: never on a command line others can read.
            self.set("private-key", str(self.key_path))
        except BaseException:
            self.close()
            raise

    def set(self, *args: str) -> None:
        """`wg set DEVICE ARGS...`."""
        self.ns.run("wg", "set", self.ifname, *args)

    def show(self, field: str) -> list[list[str]]:
        """`wg show DEVICE FIELD` (latest-handshakes, transfer, endpoints, ...): one list of
        columns per peer."""
        out = self.ns.run("wg", "show", self.ifname, field).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def up(self, address: str, *routes: str) -> None:
        """Its tunnel address, the device up, and `routes` into it."""
        self.ns.run("ip", "addr", "add", address, "dev", self.ifname)
        self.ns.run("ip", "link", "set", self.ifname, "up")
        for route in routes:
            self.ns.run("ip", "route", "add", route, "dev", self.ifname)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop it (its device goes with it) and remove its control socket, which a clean
        exit removes but a kill leaves behind."""
        terminate(self.proc)
        with contextlib.suppress(FileNotFoundError):
            (SOCKETS / f"{self.ifname}.sock").unlink()
