"""The node's hold on the system's DNS (``conn25d up --accept-dns``): which way,
the default upstreams that go with it, and undoing it.

:meth:`AcceptDNS.prepare` runs before anything else is set up: it puts back a
resolv.conf that a crashed run left (whether or not this run takes over the
DNS), decides the mode (a refusal is a :class:`~conn25.core.dnsconfig.DNSConfigError`
and changes nothing) and gives the upstreams for non-app names, read from the
original configuration. :meth:`apply` runs once the DNS server answers,
:meth:`update` on reload, :meth:`close` on exit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from ..core import dnsconfig
from ..core.dnsconfig import Mode
from .dns_forwarder import upstreams_from_resolv_conf
from .dns_transport import Upstream
from .resolvconf import ResolvConf, read_state
from .resolved import Resolved, resolved_running
from .system import SystemSetupError

log = logging.getLogger("conn25d.dns")

RESOLV_CONF = dnsconfig.RESOLV_CONF


class AcceptDNS:
    def __init__(self, *, path: str = RESOLV_CONF, state_dir: str | os.PathLike[str],
                 link: str, listen: tuple[str, int], resolvectl: str = "resolvectl",
                 resolved_upstreams: str = dnsconfig.RESOLVED_UPSTREAMS,
                 is_resolved_running: Callable[[str], bool] = resolved_running) -> None:
        self.path = path
        self.listen = listen
        self.mode = Mode.OFF
        self._file = ResolvConf(path, state_dir)
        self._resolved = Resolved(link, listen[0], listen[1], resolvectl)
        self._resolvectl = resolvectl
        self._resolved_upstreams = resolved_upstreams
        self._is_resolved_running = is_resolved_running

    def prepare(self, want: bool) -> list[Upstream]:
        """Recover a crashed run's file, choose the mode (DNSConfigError: refused) and
        return the upstreams of the original configuration."""
        self._file.recover()
        listen = self.listen[0]
        if not want:
            self.mode = Mode.OFF
            return upstreams_from_resolv_conf(self.path, exclude=[listen])
        try:
            state = read_state(self.path)
        except OSError as e:
            raise SystemSetupError(f"reading {self.path} failed: {e.strerror or e}") from None
        resolved = (dnsconfig.through_resolved(self.path, state)
                    and self._is_resolved_running(self._resolvectl))
        self.mode = dnsconfig.choose_mode(self.path, state, listen, self.listen[1],
                                          resolved_running=resolved)
        if self.mode is Mode.RESOLVED:
            return upstreams_from_resolv_conf(
                self._resolved_upstreams, exclude=[listen, *dnsconfig.RESOLVED_STUBS])
        return upstreams_from_resolv_conf(self.path, exclude=[listen], data=state.data or b"")

    def apply(self, domains: Iterable[str]) -> None:
        """Point the system's DNS at the node (its DNS server answers by now)."""
        if self.mode is Mode.DIRECT:
            self._file.take_over(self.listen[0])
        elif self.mode is Mode.RESOLVED:
            self._resolved.apply(domains)

    def update(self, domains: Iterable[str]) -> None:
        """The app domains changed (reload); a failure is logged, the old ones stay."""
        if self.mode is Mode.RESOLVED:
            try:
                self._resolved.update(domains)
            except SystemSetupError as e:
                log.error("DNS: %s", e)

    def close(self) -> None:
        """Undo :meth:`apply`; every step is tried, failures raised together."""
        errors: list[str] = []
        for undo in (self._resolved.revert, self._file.restore):
            try:
                undo()
            except SystemSetupError as e:
                errors.append(str(e))
        if errors:
            raise SystemSetupError("; ".join(errors))

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode.value}
        if self.mode is Mode.DIRECT:
            out["path"] = self.path
        if self.mode is not Mode.OFF:
            out["server"] = self.listen[0]
        return out
