"""systemd-resolved told about the node's DNS server through ``resolvectl``
(``--accept-dns`` where resolved owns ``/etc/resolv.conf``).

The TUN link gets the DNS listen address as its server and the app domains as
routing-only domains, and is not a default route: only app names reach the
node, everything else keeps the system's path. ``resolvectl revert`` undoes it
on exit; after a crash the TUN is gone and resolved forgets the link with it,
so nothing is left to recover. The commands are :mod:`conn25.core.dnsconfig`'s.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable

from ..core import dnsconfig
from .system import SystemSetupError

log = logging.getLogger("conn25d.dns")

TIMEOUT = 10.0


def _run(cmd: list[str]) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemSetupError(f"{' '.join(cmd)} failed: {e}") from None
    if r.returncode != 0:
        raise SystemSetupError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")


def resolved_running(resolvectl: str = "resolvectl") -> bool:
    """Whether systemd-resolved answers ``resolvectl`` here."""
    if shutil.which(resolvectl) is None:
        return False
    try:
        r = subprocess.run([resolvectl, "--no-pager", "status"], capture_output=True,
                           timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class Resolved:
    """The TUN's DNS settings in systemd-resolved while the node runs."""

    def __init__(self, link: str, listen: str, port: int,
                 resolvectl: str = "resolvectl") -> None:
        self.link, self.listen, self.port = link, listen, port
        self.resolvectl = resolvectl
        self.active = False

    def apply(self, domains: Iterable[str]) -> None:
        """Set the link's server and routing domains; on failure revert what was set."""
        domains = list(domains)
        self.active = True
        try:
            for cmd in dnsconfig.resolvectl_setup(self.link, self.listen, self.port, domains,
                                                  self.resolvectl):
                _run(cmd)
        except SystemSetupError:
            self.revert()
            raise
        log.info("DNS: systemd-resolved sends %s to %s on %s",
                 " ".join(dnsconfig.routing_domains(domains)) or "nothing", self.listen,
                 self.link)

    def update(self, domains: Iterable[str]) -> None:
        """New routing domains (reload)."""
        if self.active:
            domains = list(domains)
            _run(dnsconfig.resolvectl_domains(self.link, domains, self.resolvectl))
            log.info("DNS: systemd-resolved's domains on %s now %s", self.link,
                     " ".join(dnsconfig.routing_domains(domains)) or "none")

    def revert(self) -> None:
        if self.active:
            self.active = False
            _run(dnsconfig.resolvectl_revert(self.link, self.resolvectl))
