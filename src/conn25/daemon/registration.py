"""The client's registration sender: the trio shell around
:class:`conn25.core.registrar.RegistrarMachine`.

Every decision (queue, batches, retries and backoff, rejects, connector
choice, health state and failover) is the machine's; this module does the
I/O it asks for: it posts the transit-IP requests and the health checks over
HTTP, sleeps until the machine's next deadline or until something new
arrives, feeds the results back, wakes the callers of :meth:`Registrar.register`
and applies the datapath changes through :meth:`Registrar._install`, the one
place here that writes to the datapath's tables. It also resolves app-domain
queries at a connector (DNS over the peer API), in the order the machine
prefers.

Scheduling uses the trio clock (so tests run on ``MockClock``); assignment
times come from ``node.now()``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

import trio

from ..core import peerapi
from ..core.assignments import Assignment, Assignments
from ..core.config import App, Member, NodeConfig
from ..core.iprange import IPAddress
from ..core.peerapi import HEALTH_PATH, RESOLVE_PATH, TRANSIT_IP_PATH
from ..core.registrar import (
    Batch,
    CheckHealth,
    Install,
    Log,
    RegistrarMachine,
    RegistrarSettings,
    Waiter,
    Wake,
    brief,
)
from . import http
from .batcher import Batcher
from .dataplane import Dataplane

__all__ = ["Registrar", "ResolveError", "Transport"]

log = logging.getLogger("conn25.daemon.registration")

DNS_MESSAGE = "application/dns-message"
MIN_CHECK_GAP = 0.25  # seconds between health rounds, however often one is asked for
# Resolve exchanges out to one connector at once (each of up to MAX_QUERIES queries),
# within what http.ClientPool sends to one host at once.
RESOLVES_IN_FLIGHT = 4
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}


class RegistrarNode(Protocol):
    """What the registrar needs of the node."""

    config: NodeConfig
    assignments: Assignments
    dataplane: Dataplane  # where an acknowledged registration points the datapath at its connector
    peerapi_port: int  # every node serves the peer API on this port of its overlay addresses

    def assignments_changed(self) -> None:
        """Assignments were made or changed: persist them (debounced by the node)."""
        ...


class Transport(Protocol):
    """The shape of :func:`conn25.daemon.http.request`."""

    def __call__(self, host: str, port: int, method: str, target: str, body: bytes = b"", *,
                 timeout: float, content_type: str = ...) -> Awaitable[tuple[int, bytes]]: ...


class ResolveError(Exception):
    """No connector answered an app-domain query."""


class Registrar:
    """Registers a client's assignments with connectors and chooses those connectors."""

    def __init__(
        self,
        node: RegistrarNode,
        *,
        post: Transport | None = None,
        get: Transport | None = None,
        **settings: Any,
    ) -> None:
        """``settings`` are :class:`~conn25.core.registrar.RegistrarSettings`' fields."""
        self._node = node
        self.settings = RegistrarSettings(**settings)
        self.core = RegistrarMachine(node.assignments, self.settings)
        # Kept-alive connections: a fresh name costs a resolution and a registration,
        # and a new connection each would double their time. Both requests are idempotent.
        self._pool = http.ClientPool()
        self._post: Transport = post or self._pool.request
        self._get: Transport = get or self._pool.request
        self._wake = trio.Event()
        self._check_now = trio.Event()
        self._waiting: dict[Waiter, trio.Event] = {}  # register() calls still waiting
        self._resolvers: dict[str, Batcher[peerapi.ResolveQuery, peerapi.ResolveAnswer]] = {}

    @property
    def _config(self) -> NodeConfig:
        return self._node.config  # read on every use: a reload replaces it

    def counters(self) -> dict[str, int]:
        return self.core.counters()

    # -- carrying out what the machine decided ---------------------------------------------

    def _carry_out(self) -> list[Batch]:
        """Do what the machine asked for; the requests to send are returned."""
        batches: list[Batch] = []
        for action in self.core.drain():
            if isinstance(action, Batch):
                batches.append(action)
            elif isinstance(action, Install):
                self._install(action.assignment, action.connector)
            elif isinstance(action, Wake):
                done = self._waiting.get(action.waiter)
                if done is not None:
                    done.set()
            elif isinstance(action, CheckHealth):
                self._check_now.set()
            elif isinstance(action, Log):
                log.log(_LEVELS[action.level], "%s", action.text)
        return batches

    def _install(self, a: Assignment, conn: Member) -> None:
        """Point the datapath at ``conn`` for ``a`` (the machine checked ``a`` is live)."""
        node = self._node
        node.dataplane.client_registered(a, conn.name)
        node.assignments.attach(a.transit, conn.name)
        node.assignments_changed()

    def _fed(self, pending_before: int) -> None:
        """After an event: carry out, and wake the sender when items were queued."""
        self._carry_out()
        if self.core.pending > pending_before:
            self._wake.set()

    # -- registering --------------------------------------------------------------

    async def register(self, assignments: list[Assignment]) -> bool:
        """Queue ``assignments`` and wait until each is acknowledged (True) or failed (False).

        False at once when the queue has no room for them. Cancelling the
        wait leaves them queued.
        """
        before = self.core.pending
        waiter = self.core.register(assignments)
        self._fed(before)
        if waiter is None:
            return False
        if not waiter.done:
            done = self._waiting[waiter] = trio.Event()
            try:
                await done.wait()
            finally:
                del self._waiting[waiter]
        return waiter.ok

    def rejected(self, transit: IPAddress) -> None:
        """A connector rejected packets to ``transit``: send its mapping again."""
        before = self.core.pending
        self.core.rejected(transit, trio.current_time())
        self._fed(before)

    # -- the sender -----------------------------------------------------------------

    async def _sender(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                next_at = self.core.poll(trio.current_time(), self._config)
                for batch in self._carry_out():
                    nursery.start_soon(self._send, batch)
                with trio.move_on_at(next_at):
                    await self._wake.wait()

    async def _send(self, batch: Batch) -> None:
        try:
            with trio.fail_after(self.settings.request_timeout):
                status, body = await self._post(
                    batch.host, self._node.peerapi_port, "POST", TRANSIT_IP_PATH,
                    peerapi.encode(batch.request), timeout=self.settings.request_timeout,
                )
        except trio.TooSlowError:
            self.core.failed(batch, f"no answer from {batch.host} within "
                                    f"{self.settings.request_timeout}s", trio.current_time())
        except Exception as e:  # the transport's failures: OSError, HTTPError, ...
            self.core.failed(batch, f"{type(e).__name__}: {e}", trio.current_time())
        else:
            self.core.answered(batch, status, body, trio.current_time())
        self._carry_out()
        self._wake.set()  # the connector is free again

    # -- connectors -------------------------------------------------------------------

    def health_of(self, name: str, app: App) -> bool | None:
        """Whether node ``name`` serves ``app`` now: True/False, None until checked."""
        return self.core.health_of(name, app)

    def chosen_connector(self, app: App) -> Member | None:
        """The first healthy candidate, else the first not known to be down; no side effects."""
        return self.core.chosen_connector(app, self._config)

    def connector_for(self, app: App) -> Member | None:
        """The connector to use for ``app`` now; asks for a health check when unsure."""
        chosen = self.core.connector_for(app, self._config)
        self._carry_out()
        return chosen

    def health(self) -> dict[str, dict[str, Any]]:
        """What the health checks know, by node name (for the status document)."""
        return self.core.health()

    async def _health_loop(self) -> None:
        while True:
            self._check_now = trio.Event()
            await self.check_health()
            with trio.move_on_after(self.settings.health_interval) as idle:
                await self._check_now.wait()
            if not idle.cancelled_caught:
                # Every failure asks for a check: one round per gap is enough.
                await trio.sleep(min(MIN_CHECK_GAP, self.settings.health_interval))

    async def check_health(self) -> None:
        """One round: ask every candidate at once, then move mappings off failed ones."""
        targets = self.core.health_targets(self._config)
        async with trio.open_nursery() as nursery:
            for peer in targets:
                nursery.start_soon(self._check, peer)
        before = self.core.pending
        self.core.move_mappings(self._config)
        self._fed(before)

    async def _check(self, peer: Member) -> None:
        try:
            with trio.fail_after(self.settings.health_timeout):
                status, body = await self._get(
                    self.core.host_of(peer, self._config), self._node.peerapi_port, "GET",
                    HEALTH_PATH, timeout=self.settings.health_timeout,
                )
        except Exception as e:  # transport failures, TooSlowError
            self.core.health_failed(peer.name, str(e) or type(e).__name__)
        else:
            self.core.health_answer(peer.name, status, body)
        self._carry_out()

    # -- resolving at a connector ----------------------------------------------------------

    async def resolve(self, app: App, query: bytes, offers: Sequence[IPAddress] = (),
                      assigned: Mapping[IPAddress, IPAddress] | None = None,
                      ) -> tuple[str, peerapi.ResolveAnswer]:
        """A connector for ``app``'s answer to the wire ``query``: (its name, its answer).

        The connector maps the answer's addresses onto ``offers`` (transit IPs
        of ours), or onto the transit IP ``assigned`` an address already (real ->
        transit), in the same exchange; see :func:`conn25.core.peerapi.acknowledged`
        for what the caller may take from it. Queries for one connector that
        wait at the same time share exchanges (:class:`~conn25.daemon.batcher.Batcher`).
        Tries the candidates in order of preference, moving on after a
        transport failure, a non-200 answer or an unreadable body; ResolveError
        when none answered.
        """
        self.core.count("resolves")
        item = peerapi.ResolveQuery(app.name, query, [str(o) for o in offers], [
            peerapi.AssignedTransitIP(str(t), str(r)) for r, t in (assigned or {}).items()])
        errors: list[str] = []
        for i, conn in enumerate(self.core.resolve_order(app, self._config)):
            if i:
                self.core.count("resolve_failovers")
            try:
                answer = await self._resolver_of(conn).submit(item)
            except Exception as e:  # transport failures, TooSlowError, unreadable answers
                errors.append(f"{conn.name}: {type(e).__name__}: {e}")
                self._check_now.set()
                continue
            if answer.status == 200:
                return conn.name, answer
            errors.append(f"{conn.name}: HTTP {answer.status}: {answer.message}")
        self.core.count("resolve_failures")
        raise ResolveError(f"app {app.name!r}: no connector answered the query: "
                           + ("; ".join(errors) or "no connector candidates"))

    def _resolver_of(self, conn: Member) -> Batcher[peerapi.ResolveQuery, peerapi.ResolveAnswer]:
        host = self.core.host_of(conn, self._config)
        batcher = self._resolvers.get(host)
        if batcher is None:
            async def send(items: list[peerapi.ResolveQuery]) -> list[peerapi.ResolveAnswer]:
                timeout = self.settings.resolve_timeout
                with trio.fail_after(timeout):
                    status, body = await self._post(
                        host, self._node.peerapi_port, "POST", RESOLVE_PATH,
                        peerapi.encode(peerapi.ResolveRequest(items)), timeout=timeout)
                if status != 200:
                    raise http.HTTPError(f"HTTP {status}: {brief(body)}")
                return peerapi.decode_resolve_response(body).answers

            batcher = self._resolvers[host] = Batcher(
                send, max_batch=peerapi.MAX_QUERIES, max_inflight=RESOLVES_IN_FLIGHT)
        return batcher

    def mapped_in_resolution(self, a: Assignment, connector: str) -> None:
        """``connector`` mapped ``a``'s transit IP while it resolved: install it as if
        a registration had been acknowledged."""
        conn = self._config.tailnet.node(connector)
        if conn is None:
            raise ValueError(f"no node {connector!r} in the tailnet")
        self.core.count("mapped_in_resolution")
        self._install(a, conn)

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
            self.core.close()
            self._carry_out()
