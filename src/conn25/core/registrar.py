"""The client's registration decisions, as a state machine without I/O.

New assignments are registered with a connector before the DNS answer that
names their magic IPs goes out. This module decides everything about that
conversation; the trio shell (:mod:`conn25.daemon.registration`) sends the
HTTP requests, keeps the time and carries out what the machine asks for,
the way aioquic's ``QuicConnection`` is driven by its asyncio adapter:

* The shell feeds events in: :meth:`RegistrarMachine.register` (assignments
  to register), :meth:`~RegistrarMachine.answered` / :meth:`~RegistrarMachine.failed`
  (a request's result), :meth:`~RegistrarMachine.health_answer` /
  :meth:`~RegistrarMachine.health_failed`, :meth:`~RegistrarMachine.rejected`.
  Every method that depends on time takes ``now`` (the shell's scheduling
  clock), every one that depends on the configuration takes it.
* The shell takes out what to do with :meth:`~RegistrarMachine.drain`:
  :class:`Batch` (a request to send), :class:`Install` (point the datapath at
  a connector for an assignment), :class:`Wake` (a register() call has its
  outcome), :class:`CheckHealth` (run a health round soon) and :class:`Log`
  (a line to log: this module does no logging of its own).
* :meth:`~RegistrarMachine.poll` starts the requests that are due and says
  when to poll again.

The rules:

* **Queue and batches.** A bounded queue: register() beyond ``queue_size``
  fails at once and is counted. Every queued item for one connector goes in
  one request of at most ``batch_max`` items, with at most one request in
  flight per connector, so items that arrive while a request is out go
  together in the next one.
* **Outcomes.** Code 0: the mapping is installed. Code 1 ("other": rate
  limited, destination not known yet at the connector) is retried once;
  other codes are permanent. A transport failure, a non-200 answer or an
  unreadable body is retried with exponential backoff, up to ``max_attempts``
  sends. An item stays queued when its caller stops waiting, so a slow
  connector still gets the mapping.
* **Rejects**: a connector that does not know one of our transit IPs rejects
  its packets; the mapping is sent again once: not while one is pending, and
  not more often than ``reject_interval``.
* **Connector choice**: the candidates for an app are the configuration's,
  in a stable order. The chosen connector is the first candidate that
  answers its health check, advertises as a connector and lists the app;
  before the first answer, the first candidate not known to be down, so the
  first query does not wait for a health round. When a connector stops being
  healthy for an app, the mappings attached to it are re-registered with the
  connector chosen now.

May not touch: sockets, clocks, trio, logging, the datapath. It reads the
assignments (a core object) and the configuration it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from . import peerapi
from .assignments import Assignment, Assignments
from .config import App, Member, NodeConfig
from .iprange import IPAddress
from .peerapi import Code, ConnectorTransitIPRequest, TransitIPRequest, TransitIPResponse

__all__ = [
    "COUNTERS",
    "Action",
    "Batch",
    "CheckHealth",
    "Install",
    "Log",
    "RegistrarMachine",
    "RegistrarSettings",
    "Waiter",
    "Wake",
    "brief",
]

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
    "mapped_in_resolution",  # assignments a connector mapped while it resolved (no registration)
)


@dataclass(frozen=True)
class RegistrarSettings:
    """How the registrar queues, retries and checks; ValueError names a bad setting."""

    queue_size: int = 1024
    # Items of one request: 500 of the longest (v6 addresses, 253-byte names) stay well
    # under the connector's 1 MiB body limit.
    batch_max: int = 500
    health_interval: float = 2.0  # seconds between health rounds
    health_timeout: float = 1.0
    unhealthy_after: int = 2  # failed checks in a row that make a connector that was up down
    request_timeout: float = 5.0
    resolve_timeout: float = 2.0
    max_attempts: int = 6  # sends of one item before giving up
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    reject_interval: float = 1.0  # the least time between re-sends of one transit IP

    def __post_init__(self) -> None:
        for name in ("queue_size", "batch_max", "unhealthy_after", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"Registrar: {name} must be at least 1 "
                                 f"(got {getattr(self, name)})")
        for name in ("health_interval", "health_timeout", "request_timeout", "resolve_timeout",
                     "backoff_initial", "backoff_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Registrar: {name} must be positive (got {getattr(self, name)})")


def brief(body: bytes) -> str:
    """The first line of an HTTP body, for a log line or an error."""
    text = body[:200].decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "(empty body)"


class Waiter:
    """One register() call: done when each of its items has an outcome."""

    __slots__ = ("left", "ok")

    def __init__(self, count: int) -> None:
        self.left = count
        self.ok = True

    @property
    def done(self) -> bool:
        return self.left == 0


@dataclass(eq=False)
class _Item:
    assignment: Assignment
    reason: str  # "new", "reject" or "move": for the logs
    waiters: list[Waiter] = field(default_factory=list)
    attempts: int = 0  # failed sends so far
    retried_other: bool = False
    ready_at: float = -math.inf  # the shell's scheduling clock
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


# -- what the machine asks the shell to do ----------------------------------------------------


@dataclass(eq=False)
class Batch:
    """Send ``request`` to ``connector`` at ``host``; feed the result to answered()/failed()."""

    connector: Member
    host: str
    request: ConnectorTransitIPRequest
    items: list[_Item]
    sent: list[Assignment]  # what each item held when sent, in request order


@dataclass(frozen=True)
class Install:
    """Route ``assignment``'s transit IP to ``connector`` and its magic IP to the transit IP."""

    assignment: Assignment
    connector: Member


@dataclass(frozen=True)
class Wake:
    """``waiter`` has its outcome (``waiter.ok``)."""

    waiter: Waiter


@dataclass(frozen=True)
class CheckHealth:
    """Run a health round soon: a connector may have failed, or nothing is known yet."""


@dataclass(frozen=True)
class Log:
    level: Literal["info", "warning"]
    text: str


Action = Batch | Install | Wake | CheckHealth | Log


class RegistrarMachine:
    """The registration queue, batches, retries, rejects, connector choice and failover."""

    def __init__(self, assignments: Assignments,
                 settings: RegistrarSettings | None = None) -> None:
        self.assignments = assignments
        self.settings = settings or RegistrarSettings()
        # Every tracked item, queued or in flight, by transit IP (oldest first).
        self._items: dict[IPAddress, _Item] = {}
        self._busy: set[str] = set()  # connectors with a request in flight
        self._health: dict[str, _Health] = {}
        self._reject_at: dict[IPAddress, float] = {}
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._out: list[Action] = []
        self._candidates_of: NodeConfig | None = None
        self._candidates_by_app: dict[str, list[Member]] = {}

    # -- the outbox ------------------------------------------------------------------------

    def drain(self) -> list[Action]:
        """What to do, in order, since the last drain."""
        out, self._out = self._out, []
        return out

    def _log(self, level: Literal["info", "warning"], text: str) -> None:
        self._out.append(Log(level, text))

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def count(self, name: str, n: int = 1) -> None:
        """Count an event the shell saw (a resolution, a failover of one)."""
        self._counters[name] += n

    @property
    def pending(self) -> int:
        """Items queued or in flight."""
        return len(self._items)

    def is_pending(self, transit: IPAddress) -> bool:
        return transit in self._items

    # -- events ------------------------------------------------------------------------------

    def register(self, assignments: list[Assignment]) -> Waiter | None:
        """Queue ``assignments``; the waiter is woken when each has an outcome.

        None when the queue has no room for them (counted and logged). A
        waiter with nothing to wait for is done at once.
        """
        unique = {a.transit: a for a in assignments}
        waiter = Waiter(len(unique))
        if not unique:
            return waiter
        new = [t for t in unique if t not in self._items]
        if len(self._items) + len(new) > self.settings.queue_size:
            self._counters["queue_full"] += 1
            self._log("warning", f"registration queue full ({len(self._items)} items): "
                                 f"refusing {len(new)} new mappings")
            return None
        for transit, a in unique.items():
            item = self._items.get(transit)
            if item is None:
                item = self._enqueue(a, "new")
                self._counters["queued"] += 1
            else:
                item.assignment = a  # the transit IP may have been reclaimed and reassigned
            item.waiters.append(waiter)
        return waiter

    def rejected(self, transit: IPAddress, now: float) -> None:
        """A connector rejected packets to ``transit``: send its mapping again."""
        self._counters["rejects"] += 1
        a = self.assignments.by_transit(transit)
        if a is None:
            # Counted, not logged: anyone who can send us a reject can send many
            # (the node's refusal log summarises them).
            self._counters["rejects_unknown"] += 1
            return
        if transit in self._items:
            self._counters["rejects_deduplicated"] += 1
            return
        last = self._reject_at.get(transit)
        if last is not None and now - last < self.settings.reject_interval:
            self._counters["rejects_rate_limited"] += 1
            return
        if len(self._items) >= self.settings.queue_size:
            self._counters["queue_full"] += 1
            if self._counters["queue_full"] & (self._counters["queue_full"] - 1) == 0:
                # Rejects come per packet: a line at the 1st, 2nd, 4th, 8th... refusal.
                self._log("warning", f"registration queue full: cannot re-register "
                                     f"transit={transit} ({self._counters['queue_full']} "
                                     "refused so far)")
            return
        if len(self._reject_at) > 4 * self.settings.queue_size:
            self._reject_at = {t: at for t, at in self._reject_at.items()
                               if now - at < self.settings.reject_interval}
        self._reject_at[transit] = now
        self._counters["reregistrations"] += 1
        self._log("info", f"re-registering app={a.app} domain={a.domain} transit={a.transit} "
                          f"real={a.real} after a reject")
        self._enqueue(a, "reject")

    def poll(self, now: float, config: NodeConfig) -> float:
        """Start one request per idle connector with its due items; when to poll again."""
        next_at = math.inf
        batches: dict[str, tuple[Member, list[_Item]]] = {}
        # By app, for this round: (has candidates, the connector to use).
        choice: dict[str, tuple[bool, Member | None]] = {}
        for item in list(self._items.values()):
            if item.in_flight:
                continue
            if item.ready_at > now:
                next_at = min(next_at, item.ready_at)
                continue
            a = item.assignment
            if self.assignments.by_transit(a.transit) is not a:
                self._log("info", f"not registering transit={a.transit}: the assignment is gone")
                self._finish(item, False)
                continue
            app = config.app(a.app)
            if app is not None and app.name not in choice:
                has = bool(self._candidates(app, config))
                choice[app.name] = (has, self.connector_for(app, config) if has else None)
            if app is None or not choice[app.name][0]:
                self._counters["gave_up"] += 1
                why = "no such app" if app is None else "the app has no connector candidates"
                self._log("warning", f"cannot register app={a.app} domain={a.domain} "
                                     f"transit={a.transit}: {why}")
                self._finish(item, False)
                continue
            conn = choice[app.name][1]
            if conn is None:
                self._failed_attempt(item, f"no healthy connector for app {app.name!r}", now)
                if item.assignment.transit in self._items:
                    next_at = min(next_at, item.ready_at)
                continue
            if conn.name in self._busy:
                continue  # goes with the next request, when this one is answered
            batch = batches.setdefault(conn.name, (conn, []))[1]
            if len(batch) < self.settings.batch_max:
                batch.append(item)
        for name, (conn, items) in batches.items():
            for item in items:
                item.in_flight = True
            self._busy.add(name)
            sent = [i.assignment for i in items]
            request = ConnectorTransitIPRequest([
                TransitIPRequest(str(a.transit), str(a.real), a.app, a.domain) for a in sent
            ])
            self._counters["requests"] += 1
            self._out.append(Batch(conn, self.host_of(conn, config), request, items, sent))
        return next_at

    def answered(self, batch: Batch, status: int, body: bytes, now: float) -> None:
        """The connector's HTTP answer to ``batch``."""
        if status != 200:
            self.failed(batch, f"HTTP {status}: {brief(body)}", now)
            return
        try:
            resp = peerapi.decode_transit_response(body)
        except peerapi.BadRequest as e:
            self.failed(batch, str(e), now)
            return
        results = resp.transit_ips
        if len(results) != len(batch.items):
            self.failed(batch, f"{len(results)} results for {len(batch.items)} items", now)
            return
        self._settled(batch)
        for item, a, result in zip(batch.items, batch.sent, results, strict=True):
            if item.assignment is not a:
                continue  # its transit IP was reassigned meanwhile: send the new one
            self._outcome(batch.connector, item, result, now)

    def failed(self, batch: Batch, why: str, now: float) -> None:
        """``batch`` got no usable answer: transport failure, timeout, bad status or body."""
        self._settled(batch)
        self._counters["request_failures"] += 1
        self._log("warning", f"registering {len(batch.items)} mappings with "
                             f"{batch.connector.name} failed: {why}")
        self._out.append(CheckHealth())  # find out soon whether to fail over
        for item in batch.items:
            self._failed_attempt(item, why, now)

    def close(self) -> None:
        """Nobody will send the queued items now: let every waiter go."""
        for item in list(self._items.values()):
            self._finish(item, False)

    # -- health ------------------------------------------------------------------------------

    def health_targets(self, config: NodeConfig) -> list[Member]:
        """The candidates to check in a health round (forgetting those no longer candidates)."""
        candidates: dict[str, Member] = {}
        for app in config.apps:
            if not config.serves(app):
                candidates.update((n.name, n) for n in self._candidates(app, config))
        for name in [n for n in self._health if n not in candidates]:
            del self._health[name]
        self._counters["health_checks"] += len(candidates)
        return list(candidates.values())

    def health_answer(self, name: str, status: int, body: bytes) -> None:
        """Node ``name`` answered its health check."""
        if status != 200:
            self.health_failed(name, f"HTTP {status}: {brief(body)}")
            return
        try:
            answer = peerapi.decode_health(body)
        except peerapi.BadRequest as e:  # the decoder's one refusal of a bad body, as in answered()
            self.health_failed(name, str(e))
            return
        h = self._health.setdefault(name, _Health())
        if h.reachable is not True:
            self._log("info", f"connector {name} is reachable (advertises="
                              f"{answer.advertises_connector}, apps="
                              f"{','.join(answer.apps) or '-'})")
        h.reachable, h.failures, h.error = True, 0, ""
        h.advertises = answer.advertises_connector
        h.apps = frozenset(answer.apps)

    def health_failed(self, name: str, error: str) -> None:
        """Node ``name``'s health check failed (``error`` says how)."""
        self._counters["health_failures"] += 1
        h = self._health.setdefault(name, _Health())
        was_up = h.reachable
        h.failures += 1
        h.error = error
        # One miss is forgiven for a connector that was up (no flapping
        # on a lost packet); one that never answered is skipped at once.
        if h.failures >= self.settings.unhealthy_after or h.reachable is not True:
            h.reachable = False
            if was_up:
                self._counters["failovers"] += 1
                self._log("warning", f"connector {name} failed its health check: {error}")

    def health_of(self, name: str, app: App) -> bool | None:
        """Whether node ``name`` serves ``app`` now: True/False, None until checked."""
        h = self._health.get(name)
        return None if h is None else h.healthy_for(app.name)

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

    def move_mappings(self, config: NodeConfig) -> None:
        """Re-register mappings whose connector is known bad for their app with the chosen one.

        Called after every health round, not only when something changed, so
        a move that failed (the new connector's rate limit, say) is tried
        again one round later instead of leaving mappings on a dead connector.
        """
        moved: dict[tuple[str, str], int] = {}
        # By app: the candidates' names and the healthy connector to move to.
        plan: dict[str, tuple[set[str], Member | None]] = {}
        for a in self.assignments:
            if a.connector is None or a.transit in self._items:
                continue
            app = config.app(a.app)
            if app is None:
                continue
            if app.name not in plan:
                target = self.chosen_connector(app, config)
                if target is not None and self.health_of(target.name, app) is not True:
                    target = None
                plan[app.name] = ({c.name for c in self._candidates(app, config)}, target)
            names, target = plan[app.name]
            if a.connector in names and self.health_of(a.connector, app) is not False:
                continue
            if target is None or target.name == a.connector:
                continue
            self._enqueue(a, "move")  # beyond queue_size: the set is bounded by the pools
            self._counters["moved"] += 1
            moved[(a.connector, target.name)] = moved.get((a.connector, target.name), 0) + 1
        for (old, new), n in moved.items():
            self._log("warning", f"moving {n} mappings from connector {old} to {new}")

    # -- connector choice ----------------------------------------------------------------------

    def chosen_connector(self, app: App, config: NodeConfig) -> Member | None:
        """The first healthy candidate, else the first not known to be down; no side effects."""
        return next(iter(self._preferred(self._candidates(app, config), app)), None)

    def connector_for(self, app: App, config: NodeConfig) -> Member | None:
        """The connector to use for ``app`` now; asks for a health check when unsure."""
        chosen = self.chosen_connector(app, config)
        if chosen is None or self.health_of(chosen.name, app) is not True:
            self._out.append(CheckHealth())
        return chosen

    def resolve_order(self, app: App, config: NodeConfig) -> list[Member]:
        """The candidates to ask to resolve a name of ``app``, best first."""
        candidates = self._candidates(app, config)
        # With every candidate known to be down, the knowledge may be stale: try them all.
        return self._preferred(candidates, app) or candidates

    def _preferred(self, candidates: list[Member], app: App) -> list[Member]:
        """The healthy candidates, then those not checked yet (each group in its order)."""
        states = [(c, self.health_of(c.name, app)) for c in candidates]
        return [c for c, s in states if s is True] + [c for c, s in states if s is None]

    @staticmethod
    def host_of(peer: Member, config: NodeConfig) -> str:
        """The peer's overlay address in a family we have (prefer the first)."""
        own = {a.version for a in config.node.addresses}
        return str(next((a for a in peer.addresses if a.version in own), peer.addresses[0]))

    def _candidates(self, app: App, config: NodeConfig) -> list[Member]:
        # Asked for every resolution: kept per app for as long as the configuration is
        # this one (a reload makes a new NodeConfig).
        if self._candidates_of is not config:
            self._candidates_of, self._candidates_by_app = config, {}
        got = self._candidates_by_app.get(app.name)
        if got is None:
            got = self._candidates_by_app[app.name] = [
                n for n in config.connector_candidates(app) if n.addresses]
        return got

    # -- internals -----------------------------------------------------------------------------

    def _enqueue(self, a: Assignment, reason: str) -> _Item:
        item = self._items[a.transit] = _Item(a, reason)
        return item

    def _backoff(self, attempt: int) -> float:
        return min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** (attempt - 1))

    def _finish(self, item: _Item, ok: bool) -> None:
        if self._items.get(item.assignment.transit) is item:
            del self._items[item.assignment.transit]
        for w in item.waiters:
            w.ok = w.ok and ok
            w.left -= 1
            if w.done:
                self._out.append(Wake(w))
        item.waiters.clear()

    def _failed_attempt(self, item: _Item, why: str, now: float) -> None:
        item.attempts += 1
        a = item.assignment
        if item.attempts >= self.settings.max_attempts:
            self._counters["gave_up"] += 1
            self._log("warning", f"giving up registering app={a.app} domain={a.domain} "
                                 f"transit={a.transit} real={a.real} after {item.attempts} "
                                 f"attempts: {why}")
            self._finish(item, False)
            return
        self._counters["retries"] += 1
        item.ready_at = now + self._backoff(item.attempts)

    def _settled(self, batch: Batch) -> None:
        for item in batch.items:
            item.in_flight = False
        self._busy.discard(batch.connector.name)

    def _outcome(self, conn: Member, item: _Item, result: TransitIPResponse, now: float) -> None:
        a = item.assignment
        what = f"app={a.app} domain={a.domain} transit={a.transit} real={a.real}"
        if result.code == Code.OK:
            if self.assignments.by_transit(a.transit) is a:
                self._out.append(Install(a, conn))
                self._counters["acked"] += 1
                self._log("info", f"registered {what} with {conn.name} ({item.reason})")
                self._finish(item, True)
            else:
                self._log("info", f"registered {what} with {conn.name}, but the assignment "
                                  "is gone")
                self._finish(item, False)
            return
        if result.code == Code.OTHER and not item.retried_other:
            item.retried_other = True
            item.ready_at = now + self._backoff(1)
            self._counters["retried_other"] += 1
            self._log("info", f"{conn.name} refused {what} (code 1: {result.message}): "
                              "trying once more")
            return
        self._counters["refused"] += 1
        self._log("warning", f"{conn.name} refused {what}: code {result.code}: "
                             f"{result.message or '(no message)'}")
        self._finish(item, False)
