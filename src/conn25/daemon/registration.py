"""The client's registration sender and connector choice (B36-B40).

New assignments are registered with a connector before the DNS answer that
names their magic IPs goes out (B28). This module owns that conversation:

* **Queue and batches.** :meth:`Registrar.register` queues assignments (a
  bounded queue: when full the call fails at once and is counted) and waits
  for their outcome. The sender posts every queued item for one connector in
  one ``ConnectorTransitIPRequest``, with at most one request in flight per
  connector, so items that arrive while a request is out go together in the
  next one.
* **Outcomes.** Code 0: the mapping is installed (route transit -> connector,
  magic -> transit, ``Assignments.attach``). Code 1 ("other": rate limited,
  destination not known yet at the connector) is retried once; codes 2-6 are
  permanent. A transport failure, a non-200 answer or an unreadable body is
  retried with exponential backoff, up to ``max_attempts`` sends. A caller
  whose wait times out (the DNS side bounds it) just stops waiting: the item
  stays queued, so a slow connector still gets the mapping.
* **Rejects** (B40): a connector that does not know one of our transit IPs
  rejects its packets; :meth:`Registrar.rejected` re-sends that mapping once:
  not while one is pending, and not more often than ``reject_interval``.
* **Connector choice** (B37, B39): the candidates for an app come from the
  configuration in a stable order; a health task asks each for
  ``HEALTH_PATH`` every ``health_interval``. The chosen connector is the first
  candidate that answers, advertises as a connector and lists the app; before
  the first answer, the first candidate not known to be down is tried, so the
  first query does not wait for a health round. When a connector stops being
  healthy for an app, the mappings attached to it are re-registered with the
  connector chosen now, and their routes move when that one acknowledges.

Scheduling uses the trio clock (so tests run on ``MockClock``); assignment
times come from ``node.now()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import trio

from ..core import peerapi
from ..core.assignments import Assignment, Assignments
from ..core.config import App, Node, NodeConfig
from ..core.connector import DEFAULT_BURST
from ..core.iprange import IPAddress
from ..core.peerapi import (
    DNS_QUERY_PATH,
    HEALTH_PATH,
    TRANSIT_IP_PATH,
    Code,
    ConnectorTransitIPRequest,
    HealthResponse,
    TransitIPRequest,
    TransitIPResponse,
)
from . import http
from .dataplane import Dataplane

__all__ = ["COUNTERS", "Registrar", "ResolveError", "Transport"]

log = logging.getLogger("conn25.daemon.registration")

DNS_MESSAGE = "application/dns-message"
MIN_CHECK_GAP = 0.25  # seconds between health rounds, however often one is asked for

COUNTERS = (
    "queued",  # assignments accepted by register()
    "queue_full",  # register() calls and rejects refused because the queue was full
    "requests",  # transit-IP POSTs sent
    "request_failures",  # ... that failed in transport, with non-200 or an unreadable body
    "acked",  # items the connector accepted (and we installed)
    "refused",  # items that ended with a non-zero code
    "retried_other",  # code-1 items sent once more
    "retries",  # items re-queued after a failed send
    "gave_up",  # items dropped after max_attempts failed sends (or with no connector)
    "rejects",  # reject events received
    "rejects_unknown",  # ... for a transit IP we did not assign
    "rejects_deduplicated",  # ... while a registration of it was pending
    "rejects_rate_limited",  # ... within reject_interval of the last re-send
    "reregistrations",  # re-sends caused by rejects
    "moved",  # mappings re-registered because their connector failed
    "failovers",  # a connector stopped being healthy
    "health_checks",
    "health_failures",
    "resolves",
    "resolve_failovers",  # a resolution moved on to the next candidate
    "resolve_failures",  # no candidate answered
)


class RegistrarNode(Protocol):
    """What the registrar needs of the node."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def assignments(self) -> Assignments: ...

    @property
    def dataplane(self) -> Dataplane:
        """Where an acknowledged registration points the datapath at its connector."""
        ...

    @property
    def peerapi_port(self) -> int:
        """Every node serves the peer API on this port of its overlay addresses."""
        ...

    def assignments_changed(self) -> None:
        """Assignments were made or changed: persist them (debounced by the node)."""
        ...


class Transport(Protocol):
    """The shape of :func:`conn25.daemon.http.request`."""

    def __call__(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        body: bytes = b"",
        *,
        timeout: float,
        content_type: str = ...,
    ) -> Awaitable[tuple[int, bytes]]: ...


class ResolveError(Exception):
    """No connector answered an app-domain query."""


class _Waiter:
    """One register() call: done when each of its items has an outcome."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.ok = True
        self.done = trio.Event()

    def settle(self, ok: bool) -> None:
        self.ok = self.ok and ok
        self.left -= 1
        if self.left == 0:
            self.done.set()


@dataclass(eq=False)
class _Item:
    assignment: Assignment
    reason: str  # "new", "reject" or "move": for the logs
    waiters: list[_Waiter] = field(default_factory=list)
    attempts: int = 0  # failed sends so far
    retried_other: bool = False
    ready_at: float = -math.inf  # trio clock
    in_flight: bool = False


@dataclass
class _Health:
    reachable: bool | None = None  # None: no answer yet, and no failure either
    failures: int = 0  # consecutive failed checks
    advertises: bool = False
    apps: frozenset[str] = frozenset()
    error: str = ""

    def healthy_for(self, app: str) -> bool | None:
        """True/False, or None while nothing is known."""
        if self.reachable is None:
            return None
        return self.reachable and self.advertises and app in self.apps


class _SendError(Exception):
    pass


def _brief(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "(empty body)"


class Registrar:
    """Registers a client's assignments with connectors and chooses those connectors."""

    def __init__(
        self,
        node: RegistrarNode,
        *,
        queue_size: int = 1024,
        batch_max: int = DEFAULT_BURST,  # more in one request than a connector lets through
        health_interval: float = 2.0,
        health_timeout: float = 1.0,
        unhealthy_after: int = 2,
        request_timeout: float = 5.0,
        resolve_timeout: float = 2.0,
        max_attempts: int = 6,
        backoff_initial: float = 0.25,
        backoff_max: float = 8.0,
        reject_interval: float = 1.0,
        post: Transport | None = None,
        get: Transport | None = None,
    ) -> None:
        for name, value in (("queue_size", queue_size), ("batch_max", batch_max),
                            ("unhealthy_after", unhealthy_after), ("max_attempts", max_attempts)):
            if value < 1:
                raise ValueError(f"Registrar: {name} must be at least 1 (got {value})")
        for name, fvalue in (("health_interval", health_interval),
                             ("health_timeout", health_timeout),
                             ("request_timeout", request_timeout),
                             ("resolve_timeout", resolve_timeout),
                             ("backoff_initial", backoff_initial), ("backoff_max", backoff_max)):
            if not fvalue > 0:
                raise ValueError(f"Registrar: {name} must be positive (got {fvalue})")
        self._node = node
        self.queue_size = queue_size
        self.batch_max = batch_max
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.unhealthy_after = unhealthy_after
        self.request_timeout = request_timeout
        self.resolve_timeout = resolve_timeout
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.reject_interval = reject_interval
        # Kept-alive connections: a fresh name costs a resolution and a registration,
        # and a new connection each would double their time. Both requests are idempotent.
        self._pool = http.ClientPool()
        self._post: Transport = post or self._pool.request
        self._get: Transport = get or self._pool.request
        # Every tracked item, queued or in flight, by transit IP (oldest first).
        self._items: dict[IPAddress, _Item] = {}
        self._busy: set[str] = set()  # connectors with a request in flight
        self._wake = trio.Event()
        self._check_now = trio.Event()
        self._health: dict[str, _Health] = {}
        self._reject_at: dict[IPAddress, float] = {}
        self._counters = dict.fromkeys(COUNTERS, 0)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    # -- registering --------------------------------------------------------------

    async def register(self, assignments: list[Assignment]) -> bool:
        """Queue ``assignments`` and wait until each is acknowledged (True) or failed (False).

        False at once when the queue has no room for them. Cancelling the
        wait leaves them queued.
        """
        unique = {a.transit: a for a in assignments}
        if not unique:
            return True
        new = [t for t in unique if t not in self._items]
        if len(self._items) + len(new) > self.queue_size:
            self._counters["queue_full"] += 1
            log.warning("registration queue full (%d items): refusing %d new mappings",
                        len(self._items), len(new))
            return False
        waiter = _Waiter(len(unique))
        for transit, a in unique.items():
            item = self._items.get(transit)
            if item is None:
                item = self._enqueue(a, "new")
                self._counters["queued"] += 1
            else:
                item.assignment = a  # the transit IP may have been reclaimed and reassigned
            item.waiters.append(waiter)
        await waiter.done.wait()
        return waiter.ok

    def rejected(self, transit: IPAddress) -> None:
        """A connector rejected packets to ``transit``: send its mapping again (B40)."""
        self._counters["rejects"] += 1
        a = self._node.assignments.by_transit(transit)
        if a is None:
            # Counted, not logged: anyone who can send us a reject can send many
            # (the node's refusal log summarises them).
            self._counters["rejects_unknown"] += 1
            return
        if transit in self._items:
            self._counters["rejects_deduplicated"] += 1
            return
        now = trio.current_time()
        last = self._reject_at.get(transit)
        if last is not None and now - last < self.reject_interval:
            self._counters["rejects_rate_limited"] += 1
            return
        if len(self._items) >= self.queue_size:
            self._counters["queue_full"] += 1
            if self._counters["queue_full"] & (self._counters["queue_full"] - 1) == 0:
                # Rejects come per packet: a line at the 1st, 2nd, 4th, 8th... refusal.
                log.warning("registration queue full: cannot re-register transit=%s "
                            "(%d refused so far)", transit, self._counters["queue_full"])
            return
        if len(self._reject_at) > 4 * self.queue_size:
            self._reject_at = {t: at for t, at in self._reject_at.items()
                               if now - at < self.reject_interval}
        self._reject_at[transit] = now
        self._counters["reregistrations"] += 1
        log.info("re-registering app=%s domain=%s transit=%s real=%s after a reject", a.app,
                 a.domain, a.transit, a.real)
        self._enqueue(a, "reject")

    def _enqueue(self, a: Assignment, reason: str) -> _Item:
        item = self._items[a.transit] = _Item(a, reason)
        self._wake.set()
        return item

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))

    def _finish(self, item: _Item, ok: bool) -> None:
        if self._items.get(item.assignment.transit) is item:
            del self._items[item.assignment.transit]
        for w in item.waiters:
            w.settle(ok)
        item.waiters.clear()

    def _failed_attempt(self, item: _Item, why: str) -> None:
        item.attempts += 1
        a = item.assignment
        if item.attempts >= self.max_attempts:
            self._counters["gave_up"] += 1
            log.warning("giving up registering app=%s domain=%s transit=%s real=%s after %d "
                        "attempts: %s", a.app, a.domain, a.transit, a.real, item.attempts, why)
            self._finish(item, False)
            return
        self._counters["retries"] += 1
        item.ready_at = trio.current_time() + self._backoff(item.attempts)

    # -- the sender -----------------------------------------------------------------

    async def _sender(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                next_at = self._dispatch(nursery)
                with trio.move_on_at(next_at):
                    await self._wake.wait()

    def _dispatch(self, nursery: trio.Nursery) -> float:
        """Start one request per idle connector with its ready items; when to look again."""
        now = trio.current_time()
        cfg = self._node.config
        next_at = math.inf
        batches: dict[str, tuple[Node, list[_Item]]] = {}
        # By app, for this round: (has candidates, the connector to use).
        choice: dict[str, tuple[bool, Node | None]] = {}
        for item in list(self._items.values()):
            if item.in_flight:
                continue
            if item.ready_at > now:
                next_at = min(next_at, item.ready_at)
                continue
            a = item.assignment
            if self._node.assignments.by_transit(a.transit) is not a:
                log.info("not registering transit=%s: the assignment is gone", a.transit)
                self._finish(item, False)
                continue
            app = cfg.app(a.app)
            if app is not None and app.name not in choice:
                has = bool(self._candidates(app))
                choice[app.name] = (has, self.connector_for(app) if has else None)
            if app is None or not choice[app.name][0]:
                self._counters["gave_up"] += 1
                log.warning("cannot register app=%s domain=%s transit=%s: %s", a.app, a.domain,
                            a.transit, "no such app" if app is None else "the app has no "
                            "connector candidates")
                self._finish(item, False)
                continue
            conn = choice[app.name][1]
            if conn is None:
                self._failed_attempt(item, f"no healthy connector for app {app.name!r}")
                if item.assignment.transit in self._items:
                    next_at = min(next_at, item.ready_at)
                continue
            if conn.name in self._busy:
                continue  # goes with the next request, when this one is answered
            batch = batches.setdefault(conn.name, (conn, []))[1]
            if len(batch) < self.batch_max:
                batch.append(item)
        for name, (conn, items) in batches.items():
            for item in items:
                item.in_flight = True
            self._busy.add(name)
            nursery.start_soon(self._send, conn, items)
        return next_at

    async def _send(self, conn: Node, items: list[_Item]) -> None:
        sent = [i.assignment for i in items]
        try:
            req = ConnectorTransitIPRequest([
                TransitIPRequest(str(a.transit), str(a.real), a.app, a.domain) for a in sent
            ])
            self._counters["requests"] += 1
            try:
                results = await self._exchange(conn, req)
            except _SendError as e:
                self._counters["request_failures"] += 1
                log.warning("registering %d mappings with %s failed: %s", len(items), conn.name, e)
                self._check_now.set()  # find out soon whether to fail over
                for item in items:
                    item.in_flight = False
                    self._failed_attempt(item, str(e))
                return
            for item, a, result in zip(items, sent, results, strict=True):
                item.in_flight = False
                if item.assignment is not a:
                    continue  # its transit IP was reassigned meanwhile: send the new one
                self._outcome(conn, item, result)
        finally:
            for item in items:
                item.in_flight = False
            self._busy.discard(conn.name)
            self._wake.set()

    async def _exchange(
        self, conn: Node, req: ConnectorTransitIPRequest
    ) -> list[TransitIPResponse]:
        host = self._host(conn)
        try:
            with trio.fail_after(self.request_timeout):
                status, body = await self._post(
                    host, self._node.peerapi_port, "POST", TRANSIT_IP_PATH, peerapi.encode(req),
                    timeout=self.request_timeout,
                )
        except trio.TooSlowError:
            raise _SendError(f"no answer from {host} within {self.request_timeout}s") from None
        except Exception as e:  # the transport's failures: OSError, HTTPError, ...
            raise _SendError(f"{type(e).__name__}: {e}") from None
        if status != 200:
            raise _SendError(f"HTTP {status}: {_brief(body)}")
        try:
            resp = peerapi.decode_transit_response(body)
        except peerapi.BadRequest as e:
            raise _SendError(str(e)) from None
        if len(resp.transit_ips) != len(req.transit_ips):
            raise _SendError(f"{len(resp.transit_ips)} results for {len(req.transit_ips)} items")
        return resp.transit_ips

    def _outcome(self, conn: Node, item: _Item, result: TransitIPResponse) -> None:
        a = item.assignment
        what = f"app={a.app} domain={a.domain} transit={a.transit} real={a.real}"
        if result.code == Code.OK:
            if self._install(a, conn):
                self._counters["acked"] += 1
                log.info("registered %s with %s (%s)", what, conn.name, item.reason)
                self._finish(item, True)
            else:
                log.info("registered %s with %s, but the assignment is gone", what, conn.name)
                self._finish(item, False)
            return
        if result.code == Code.OTHER and not item.retried_other:
            item.retried_other = True
            item.ready_at = trio.current_time() + self._backoff(1)
            self._counters["retried_other"] += 1
            log.info("%s refused %s (code 1: %s): trying once more", conn.name, what,
                     result.message)
            return
        self._counters["refused"] += 1
        log.warning("%s refused %s: code %d: %s", conn.name, what, result.code,
                    result.message or "(no message)")
        self._finish(item, False)

    def _install(self, a: Assignment, conn: Node) -> bool:
        """Point the datapath at ``conn`` for ``a``; False when ``a`` was reclaimed meanwhile."""
        node = self._node
        if node.assignments.by_transit(a.transit) is not a:
            return False
        node.dataplane.client_registered(a, conn.name)
        node.assignments.attach(a.transit, conn.name)
        node.assignments_changed()
        return True

    # -- connectors -------------------------------------------------------------------

    def _candidates(self, app: App) -> list[Node]:
        return [n for n in self._node.config.connector_candidates(app) if n.addresses]

    def _host(self, peer: Node) -> str:
        """The peer's overlay address in a family we have (prefer the first)."""
        own = {a.version for a in self._node.config.node.addresses}
        return str(next((a for a in peer.addresses if a.version in own), peer.addresses[0]))

    def health_of(self, name: str, app: App) -> bool | None:
        """Whether node ``name`` serves ``app`` now: True/False, None until checked."""
        h = self._health.get(name)
        return None if h is None else h.healthy_for(app.name)

    def chosen_connector(self, app: App) -> Node | None:
        """The first healthy candidate, else the first not known to be down; no side effects."""
        candidates = self._candidates(app)
        states = [(c, self.health_of(c.name, app)) for c in candidates]
        return (next((c for c, s in states if s is True), None)
                or next((c for c, s in states if s is None), None))

    def connector_for(self, app: App) -> Node | None:
        """The connector to use for ``app`` now (B37); asks for a health check when unsure."""
        chosen = self.chosen_connector(app)
        if chosen is None or self.health_of(chosen.name, app) is not True:
            self._check_now.set()
        return chosen

    def health(self) -> dict[str, dict[str, Any]]:
        """What the health checks know, by node name (for the status document)."""
        return {
            name: {
                "reachable": h.reachable,
                "advertisesConnector": h.advertises,
                "apps": sorted(h.apps),
                "failures": h.failures,
                "error": h.error,
            }
            for name, h in sorted(self._health.items())
        }

    async def _health_loop(self) -> None:
        while True:
            self._check_now = trio.Event()
            await self.check_health()
            with trio.move_on_after(self.health_interval) as idle:
                await self._check_now.wait()
            if not idle.cancelled_caught:
                # Every failure asks for a check: one round per gap is enough.
                await trio.sleep(min(MIN_CHECK_GAP, self.health_interval))

    def _all_candidates(self) -> dict[str, Node]:
        cfg = self._node.config
        out: dict[str, Node] = {}
        for app in cfg.apps:
            if not cfg.serves(app):
                out.update((n.name, n) for n in self._candidates(app))
        return out

    async def check_health(self) -> None:
        """One round: ask every candidate at once, then move mappings off failed ones.

        The move runs every round, not only when something changed, so a
        move that failed (the new connector's rate limit, say) is tried again
        one interval later instead of leaving mappings on a dead connector.
        """
        candidates = self._all_candidates()
        for name in [n for n in self._health if n not in candidates]:
            del self._health[name]
        async with trio.open_nursery() as nursery:
            for peer in candidates.values():
                nursery.start_soon(self._check, peer)
        self._move_mappings()

    async def _check(self, peer: Node) -> None:
        self._counters["health_checks"] += 1
        h = self._health.setdefault(peer.name, _Health())
        was_up = h.reachable
        try:
            with trio.fail_after(self.health_timeout):
                status, body = await self._get(self._host(peer), self._node.peerapi_port, "GET",
                                               HEALTH_PATH, timeout=self.health_timeout)
            if status != 200:
                raise _SendError(f"HTTP {status}: {_brief(body)}")
            answer: HealthResponse = peerapi.decode_health(body)
        except Exception as e:  # transport failures, TooSlowError, a bad body
            self._counters["health_failures"] += 1
            h.failures += 1
            h.error = str(e) or type(e).__name__
            # One miss is forgiven for a connector that was up (no flapping
            # on a lost packet); one that never answered is skipped at once.
            if h.failures >= self.unhealthy_after or h.reachable is not True:
                h.reachable = False
                if was_up:
                    self._counters["failovers"] += 1
                    log.warning("connector %s failed its health check: %s", peer.name, h.error)
            return
        if was_up is not True:
            log.info("connector %s is reachable (advertises=%s, apps=%s)", peer.name,
                     answer.advertises_connector, ",".join(answer.apps) or "-")
        h.reachable, h.failures, h.error = True, 0, ""
        h.advertises = answer.advertises_connector
        h.apps = frozenset(answer.apps)

    def _move_mappings(self) -> None:
        """Re-register mappings whose connector is known bad for their app with the chosen one."""
        cfg = self._node.config
        moved: dict[tuple[str, str], int] = {}
        # By app: the candidates' names and the healthy connector to move to.
        plan: dict[str, tuple[set[str], Node | None]] = {}
        for a in self._node.assignments:
            if a.connector is None or a.transit in self._items:
                continue
            app = cfg.app(a.app)
            if app is None:
                continue
            if app.name not in plan:
                target = self.chosen_connector(app)
                if target is not None and self.health_of(target.name, app) is not True:
                    target = None
                plan[app.name] = ({c.name for c in self._candidates(app)}, target)
            names, target = plan[app.name]
            if a.connector in names and self.health_of(a.connector, app) is not False:
                continue
            if target is None or target.name == a.connector:
                continue
            self._enqueue(a, "move")  # beyond queue_size: the set is bounded by the pools
            self._counters["moved"] += 1
            moved[(a.connector, target.name)] = moved.get((a.connector, target.name), 0) + 1
        for (old, new), n in moved.items():
            log.warning("moving %d mappings from connector %s to %s", n, old, new)

    # -- resolving at a connector ----------------------------------------------------------

    def _resolve_order(self, app: App) -> list[Node]:
        candidates = self._candidates(app)
        good = [c for c in candidates if self.health_of(c.name, app) is True]
        unknown = [c for c in candidates if self.health_of(c.name, app) is None]
        # With every candidate known to be down, the knowledge may be stale: try them all.
        return good + unknown or candidates

    async def resolve(self, app: App, query: bytes) -> bytes:
        """The wire answer of a connector for ``app`` to the wire ``query``.

        Tries the candidates in order of preference, moving on after a
        transport failure or a non-200 answer; ResolveError when none answered.
        """
        self._counters["resolves"] += 1
        target = f"{DNS_QUERY_PATH}?app={quote(app.name, safe='')}"
        errors: list[str] = []
        for i, conn in enumerate(self._resolve_order(app)):
            if i:
                self._counters["resolve_failovers"] += 1
            try:
                with trio.fail_after(self.resolve_timeout):
                    status, body = await self._post(
                        self._host(conn), self._node.peerapi_port, "POST", target, query,
                        timeout=self.resolve_timeout, content_type=DNS_MESSAGE,
                    )
            except Exception as e:  # transport failures and TooSlowError
                errors.append(f"{conn.name}: {type(e).__name__}: {e}")
                self._check_now.set()
                continue
            if status == 200:
                return body
            errors.append(f"{conn.name}: HTTP {status}: {_brief(body)}")
        self._counters["resolve_failures"] += 1
        raise ResolveError(f"app {app.name!r}: no connector answered the query: "
                           + ("; ".join(errors) or "no connector candidates"))

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sender and the health checker, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender)
                nursery.start_soon(self._health_loop)
                task_status.started()
        finally:
            self._pool.close()
            # Nobody will send them now: let any waiter go.
            for item in list(self._items.values()):
                self._finish(item, False)

