"""The client's app resolver: the ``answer`` the node gives its DNS server.

A query is parsed once (:func:`conn25.core.dnsquery.parse`) and that value
goes through the core: the answer cache, the mapper's choice of app, the
forwarder for non-app queries. App-domain queries are resolved at a
connector, mapped onto magic IPs, and answered only once the connector
acknowledged every new mapping. A fresh name costs one exchange: the query
carries transit IPs that the connector maps the answer's addresses onto
while it resolves; only addresses beyond those offers are registered
separately. May touch: the trio clock (its deadlines)
and the log; the sockets are the forwarder's and the registrar's.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

import trio
from dnslib import QTYPE

from ..core import dnsname
from ..core.assignments import Assignment
from ..core.config import App, NodeConfig
from ..core.dnscache import AnswerCache
from ..core.dnsmap import DNSMapper
from ..core.dnsquery import DNSMapError, Query, answers, parse, servfail_to, with_id
from ..core.iprange import IPAddress
from ..core.peerapi import MAX_OFFERS, ResolveAnswer, acknowledged
from .dns_forwarder import Forwarder
from .inflight import Coalescer
from .loglater import LaterLog

__all__ = ["DEFAULT_OFFERS", "RESOLVER_COUNTERS", "ClientResolver", "Resolve"]

log = logging.getLogger(__name__)

RESOLVER_COUNTERS = (
    "queries", "forwarded", "app_queries", "answered_mapped", "answered_cached",
    "assignments_new", "mapped_in_resolution", "coalesced",
    "registrations", "servfail_connector", "servfail_mapping", "servfail_ack_timeout",
    "servfail_register",
)


# Transit IPs offered with each A or AAAA question: most answers have fewer addresses;
# those of a larger one beyond the offers are registered separately.
DEFAULT_OFFERS = 8
_FAMILY = {int(QTYPE.A): 4, int(QTYPE.AAAA): 6}


class Resolve(Protocol):
    """A connector's answer to a query, its addresses mapped onto our offers where it
    could: (the connector's name, its answer)."""

    def __call__(self, app: App, query: bytes, offers: Sequence[IPAddress],
                 assigned: Mapping[IPAddress, IPAddress]
                 ) -> Awaitable[tuple[str, ResolveAnswer]]: ...


class _Registration:
    """One call to ``register`` that other queries for the same assignments may wait for."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False


class _Described:
    """A query as its log lines name it ("dns: NAME TYPE (app APP)"), made when a line is:
    most fresh names need it only in the line logged after their answer."""

    __slots__ = ("app", "query")

    def __init__(self, query: Query, app: App) -> None:
        self.query = query
        self.app = app

    def __str__(self) -> str:
        name, qtype, _ = self.query.questions[0].folded
        domain = ".".join(p.decode("ascii", "replace") for p in name) + "."
        return f"dns: {domain} {QTYPE.get(qtype)} (app {self.app.name})"


class _Answered:
    """An answer's assignments as its log line lists them, made when the line is."""

    __slots__ = ("assignments",)

    def __init__(self, assignments: list[Assignment]) -> None:
        self.assignments = assignments

    def __str__(self) -> str:
        return ", ".join(f"{a.magic} (real {a.real}, transit {a.transit})"
                         for a in self.assignments) or "with no address"


@dataclass(eq=False, repr=False)  # equal only to itself, as before
class ClientResolver:
    """The client's ``answer``: non-app queries go upstream unchanged; app queries are
    resolved at a connector, mapped onto magic IPs and answered once the
    connector acknowledged every assignment in the answer, so that the first packet
    to a magic IP finds its mapping at the connector.

    Waiting covers more than ``MapResult.new``: an assignment of the answer
    that is not registered with any connector yet (an earlier registration
    failed or is still on its way, for a concurrent query of the same name)
    is waited for too, so no answer names a magic IP whose transit IP the
    connector does not know. On ``ack_timeout`` (or a failed registration)
    the answer is SERVFAIL and counted; the registrar is expected to keep
    what it was given and send it anyway.

    Acknowledged mapped answers are cached (:mod:`conn25.core.dnscache`) for their
    TTL; :meth:`cached` answers a repeated question from there, as long as
    every assignment it names is still the live one and registered.
    """

    mapper: DNSMapper
    forwarder: Forwarder
    resolve_at_connector: Resolve
    register: Callable[[list[Assignment]], Awaitable[bool]]
    # The connector (by name) mapped the assignment's transit IP while it resolved.
    mapped: Callable[[Assignment, str], None]
    ack_timeout: float = 3.0
    now: Callable[[], float] = time.time
    _: KW_ONLY
    resolve_timeout: float = 5.0
    offers: int = DEFAULT_OFFERS
    assignments_changed: Callable[[], None] | None = None
    # Where the line about each mapped answer goes: after the answer (the node runs it).
    later: LaterLog = field(default_factory=LaterLog)
    cache: AnswerCache = field(init=False, default_factory=AnswerCache)
    # The same question again while it is answered (a stub resolver's retry) waits for it.
    _inflight: Coalescer = field(init=False, default_factory=Coalescer)
    # Registrations under way, by transit IP.
    _pending: dict[IPAddress, _Registration] = field(init=False, default_factory=dict)
    _counters: Counter[str] = field(
        init=False, default_factory=lambda: Counter(dict.fromkeys(RESOLVER_COUNTERS, 0)))

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def reconfigure(self, config: NodeConfig) -> None:
        """Use a reloaded configuration; cached answers may name apps it no longer has."""
        self.mapper.config = config
        self.cache.clear()

    def cached(self, wire: bytes) -> bytes | None:
        """The answer to the query ``wire`` from the cache, or None to take :meth:`answer`."""
        try:
            query = parse(wire)
        except DNSMapError:
            return None
        return self._cached(query)[0]

    def _cached(self, query: Query) -> tuple[bytes | None, App | None]:
        """(the cached answer or None, the query's app as far as it had to be found)."""
        hit = self.cache.get(query, self.now())
        if hit is None:
            app = self.mapper.app_for(query)
            return (self._forwarded_cached(query) if app is None else None), app
        reply, assignments = hit
        by_magic = self.mapper.assignments.by_magic
        if not all(a.connector is not None and by_magic(a.magic) is a for a in assignments):
            self.cache.drop(query)  # reclaimed or moving to another connector: ask again
            return None, self.mapper.app_for(query)
        self._counters["queries"] += 1
        self._counters["app_queries"] += 1
        self._counters["answered_cached"] += 1
        return reply, None

    def _forwarded_cached(self, query: Query) -> bytes | None:
        """A cached forwarded answer, for a name that is no app's only (the caller checked):
        an app name must never get an unmapped answer, whoever else (a connector on this
        node) asked it."""
        if query.key is None:
            return None
        reply = self.forwarder.cache.get(query, self.forwarder.now())
        if reply is not None:
            self._counters["queries"] += 1
            self._counters["forwarded"] += 1
            self.forwarder.count_cache_hit()
        return reply

    async def answer(self, wire: bytes) -> bytes:
        """The answer to the query ``wire``; DNSMapError when it is not a readable query."""
        try:
            query = parse(wire)  # the only time these bytes are parsed on the way
        except DNSMapError:
            self._counters["queries"] += 1
            raise
        cached, app = self._cached(query)
        if cached is not None:
            return cached
        self._counters["queries"] += 1
        if app is None:
            self._counters["forwarded"] += 1
            return await self.forwarder.forward(query)
        self._counters["app_queries"] += 1
        if query.qr or not query.complete:
            raise DNSMapError("DNS message is a response or has a question that cannot be read")
        answer, shared = await self._inflight.answer(
            query.key, lambda: self._answer_app(query, wire, app),
            self.resolve_timeout + self.ack_timeout)
        if shared:
            self._counters["coalesced"] += 1
        if answer is None:
            return servfail_to(query)
        return with_id(answer, wire) if shared else answer

    async def _answer_app(self, query: Query, wire: bytes, app: App) -> bytes:
        what = self._describe(query, app)
        offers, assigned = self._offers(query)
        try:
            return await self._resolve_and_map(query, wire, app, what, offers, assigned)
        finally:
            # Those no new assignment took (the connector's mapping of them, if any,
            # is replaced when the transit IP is registered for something else).
            self.mapper.assignments.release_transits(offers)

    def _offers(self, query: Query) -> tuple[list[IPAddress], dict[IPAddress, IPAddress]]:
        """What a connector may map this question's answer onto (see ResolveQuery): transit
        IPs taken from the pool, and real -> transit of the name's assignments of the
        question's family, which the connector maps again if the answer still holds them."""
        q = query.questions[0]
        version = _FAMILY.get(q.qtype)
        if version is None:
            return [], {}
        store = self.mapper.assignments
        offers = store.take_transits(version, self.offers) if self.offers else []
        try:
            domain = dnsname.from_labels(q.labels)
        except ValueError:
            return offers, {}
        held = [a for a in store.by_domain(domain) if a.real.version == version]
        return offers, {a.real: a.transit for a in held[:MAX_OFFERS - len(offers)]}

    async def _resolve_and_map(self, query: Query, wire: bytes, app: App, what: _Described,
                               offers: list[IPAddress],
                               assigned: dict[IPAddress, IPAddress]) -> bytes:
        resolved: tuple[str, ResolveAnswer] | None = None
        try:
            # A plain scope, not fail_after's generator around one: every fresh name pays it.
            with trio.CancelScope(relative_deadline=self.resolve_timeout):
                resolved = await self.resolve_at_connector(app, wire, offers, assigned)
        except Exception as e:
            return self._servfail(query, "servfail_connector",
                                  f"{what}: connector resolution failed: {type(e).__name__}: {e}")
        if resolved is None:
            return self._servfail(query, "servfail_connector",
                                  f"{what}: no answer from a connector in {self.resolve_timeout}s")
        connector, resolution = resolved
        resp = resolution.answer
        # The connector echoes our query; DoH-style channels may zero the id, so only
        # the question must match (a different name would be mapped for the wrong query).
        rhead = answers(query, with_id(resp, wire)) if len(resp) >= 12 else None
        if rhead is None:
            return self._servfail(query, "servfail_connector",
                                  f"{what}: the connector's answer is not for this question")
        # The answer as checked (our id in it), with its head: the mapper reads it no more.
        mapped = acknowledged(resolution, [*offers, *assigned.values()])
        result = self.mapper.map_response(rhead.wire, self.now(), rhead, mapped)
        self._counters["assignments_new"] += len(result.new)
        for a in result.assignments:
            # New, or not registered anywhere yet: the connector has it now. No await
            # since map_response, so nobody saw a new one unmapped.
            if a.connector is None and mapped.get(a.real) == a.transit:
                self.mapped(a, connector)
                self._counters["mapped_in_resolution"] += 1
        # Made, or their expiry refreshed: worth persisting.
        if result.assignments and self.assignments_changed is not None:
            self.assignments_changed()
        if result.servfail:
            self._counters["servfail_mapping"] += 1
        ok = await self._registered(result.assignments, what)
        if not ok and not result.servfail:
            return servfail_to(query)
        if result.ours and not result.servfail:
            self._counters["answered_mapped"] += 1
            self.cache.put(query, result.wire, result.assignments, self.now())
            self.later.log(log, logging.INFO, "%s: answered %s", what,
                           _Answered(result.assignments))
        return with_id(result.wire, wire)

    async def _registered(self, assignments: list[Assignment], what: _Described) -> bool:
        """Register those not registered yet and wait for them and those in flight."""
        mine = [a for a in assignments if a.connector is None and a.transit not in self._pending]
        theirs = {id(r): r for a in assignments
                  if (r := self._pending.get(a.transit)) is not None}
        if not mine and not theirs:
            return True
        timed_out = True
        failed = False
        with trio.move_on_after(self.ack_timeout):
            if mine:
                failed = not await self._register(mine, what)
            for registration in theirs.values():
                await registration.done.wait()
                failed = failed or not registration.ok
            timed_out = False
        if timed_out:
            self._counters["servfail_ack_timeout"] += 1
            log.warning("%s: no acknowledgement from the connector within %ss; answering "
                        "SERVFAIL", what, self.ack_timeout)
            return False
        if failed:
            self._counters["servfail_register"] += 1
            log.warning("%s: the connector did not accept the mappings; answering SERVFAIL",
                        what)
            return False
        return True

    async def _register(self, assignments: list[Assignment], what: _Described) -> bool:
        registration = _Registration()
        for a in assignments:
            self._pending[a.transit] = registration
        self._counters["registrations"] += 1
        try:
            registration.ok = bool(await self.register(assignments))
        except Exception as e:
            log.warning("%s: registration failed: %s: %s", what, type(e).__name__, e)
        finally:
            # Also on cancellation (ack timeout): whoever waits learns it failed.
            registration.done.set()
            for a in assignments:
                if self._pending.get(a.transit) is registration:
                    del self._pending[a.transit]
        return registration.ok

    def _servfail(self, query: Query, counter: str, reason: str) -> bytes:
        self._counters[counter] += 1
        log.warning("%s; answering SERVFAIL", reason)
        return servfail_to(query)

    @staticmethod
    def _describe(query: Query, app: App) -> _Described:
        return _Described(query, app)

