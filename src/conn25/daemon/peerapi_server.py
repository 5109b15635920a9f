"""The peer API's routes: what a node answers other nodes on its overlay address.

* ``POST TRANSIT_IP_PATH``: a client registers transit IPs with this
  connector. Items that carry a ``domain`` whose destination
  this connector has not seen resolve are checked against a fresh
  resolution first; accepted mappings go to the datapath.
* ``POST DNS_QUERY_PATH?app=NAME``: a client resolves one of the app's
  names here (RFC 8484 style, DNS wire format both ways), so names that only
  resolve inside the connector's network work. The answer's addresses become
  acceptable destinations for the app.
* ``POST RESOLVE_PATH``: the same resolution, with transit IPs the client
  offers: the answer's addresses are mapped onto them (checked and limited
  as registrations are) and the DNS answer comes back with a result per
  mapping, so a fresh name costs one round trip.
* ``GET HEALTH_PATH``: whether this node advertises as a connector, and for
  which apps.

The caller is the overlay source address of the connection, which the
fastpath's anti-spoofing check vouches for; an address of no node gets 403
(and, served with :data:`PEERAPI_LIMITS` and :meth:`PeerAPI.is_peer`, its
connection is closed before any request). Refusals a peer can cause per
request or per item are counted and logged as summaries per peer.

The server sees the node only through :class:`PeerAPINode`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import trio
from dnslib import QTYPE, DNSRecord

from ..core import dnsname, peerapi
from ..core.config import Member, NodeConfig
from ..core.connector import ConnectorTable, Mapping
from ..core.dnsmap import DNSMapError, answer_addresses, query_question
from ..core.iprange import IPAddress
from ..core.peerapi import (
    DNS_QUERY_PATH,
    HEALTH_PATH,
    RESOLVE_PATH,
    TRANSIT_IP_PATH,
    BadRequest,
    Code,
    ConnectorTransitIPRequest,
    ConnectorTransitIPResponse,
    HealthResponse,
    NotConfigured,
)
from ..core.throttle import SourceLimits
from .http import Limits, Request, Response
from .refusals import RefusalLog

log = logging.getLogger("conn25.core.peerapi")

DNS_MESSAGE = "application/dns-message"
# Upstream resolutions one registration or resolve request may run at once.
RESOLVE_CONCURRENCY = 8
NOT_CONNECTOR_MESSAGE = "this node is not a connector for any app"
# What the peer API allows each peer (overlay source address) on its own, so that
# one peer at its maximum leaves the others' health checks, resolutions and
# registrations unaffected. A client sends at most 8 requests at once to a
# connector and keeps at most 8 idle connections (http.ClientPool), so 24 is
# ample; the total only guards memory. A fresh name costs a client one request,
# so the burst lets a browser's start-up (2,000 fresh names, an A and an AAAA
# each) through while one peer still gets only a share of the connector's time.
PEERAPI_LIMITS = Limits(
    idle_timeout=30.0,
    header_timeout=5.0,
    request_timeout=10.0,
    handler_timeout=30.0,
    max_connections=1024,
    per_source=SourceLimits(max_connections=24, rate=400.0, burst=4096.0),
)



def _item_reason(code: int) -> str:
    return f"transit_ip_code_{int(code)}"


# The refusals the routes count (besides peerapi_http_STATUS), for metrics that
# list them from the start.
REFUSAL_REASONS = ("resolution_failed", *(_item_reason(c) for c in Code if c is not Code.OK))


class _Refusal(NamedTuple):
    """Why a query is not answered: the HTTP status the dns-query route gives it."""

    status: int
    reason: str


class Upstream(Protocol):
    """Where the peer API resolves names (the node's DNS forwarder)."""

    async def forward(self, query: bytes) -> bytes:
        """The upstream's wire answer to the wire ``query``; raises when there is none."""
        ...


class PeerAPINode(Protocol):
    """What the peer API needs of the node."""

    @property
    def config(self) -> NodeConfig: ...

    @property
    def connector(self) -> ConnectorTable | None:
        """None unless the node advertises as a connector."""
        ...

    @property
    def forwarder(self) -> Upstream: ...

    def now(self) -> float:
        """Wall-clock seconds, the time base of connector mappings."""
        ...

    def install_connector_mappings(self, mappings: Iterable[Mapping]) -> None:
        """Put accepted (peer, transit) -> real mappings into the datapath."""
        ...


class PeerAPI:
    """Routes of the peer API; ``handle`` is an :data:`conn25.daemon.http.Handler`."""

    def __init__(self, node: PeerAPINode, refusals: RefusalLog | None = None) -> None:
        self._node = node
        self.refusals = refusals if refusals is not None else RefusalLog(log)
        self._routes = {
            TRANSIT_IP_PATH: self._transit_ip,
            DNS_QUERY_PATH: self._dns_query,
            RESOLVE_PATH: self._resolve_offered,
            HEALTH_PATH: self._health,
        }

    async def handle(self, req: Request) -> Response:
        path = req.path
        route = self._routes.get(path)
        if route is None:
            return self._error(req, None, 404, f"no such endpoint {path!r}")
        peer = self._peer(req)
        if peer is None:
            return self._error(req, None, 403, "the source address is not a node of the tailnet")
        return await route(req, peer)

    # -- identity and errors ----------------------------------------------------

    def is_peer(self, address: str) -> bool:
        """Whether ``address`` is another node's overlay address (``accept_source``).

        This node's own addresses are not: a local process is no peer, and a
        node never uses its own peer API (it is no candidate connector of itself).
        """
        node = self._peer_by_address(address)
        return node is not None and node.name != self._node.config.node.name

    def _peer(self, req: Request) -> Member | None:
        return None if req.peer is None else self._peer_by_address(req.peer[0])

    def _peer_by_address(self, address: str) -> Member | None:
        try:
            addr: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return None
        # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return self._node.config.peer_by_address(addr)

    def _error(
        self,
        req: Request,
        peer: Member | None,
        status: int,
        reason: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        self._count_refusal(req, peer, status, reason)
        return Response.text(status, reason, headers)

    def _count_refusal(self, req: Request, peer: Member | None, status: int, reason: str) -> None:
        who = peer.name if peer is not None else (req.peer[0] if req.peer else "local")
        # A peer can send bad requests as fast as it likes: a summary, not a line each.
        self.refusals.refuse(who, f"peerapi_http_{status}",
                             f"{req.method} {req.path}: {status} {reason}",
                             level=logging.WARNING)

    # -- transit-ip ---------------------------------------------------------------

    async def _transit_ip(self, req: Request, peer: Member) -> Response:
        connector = self._node.connector
        body: bytes | ConnectorTransitIPRequest = req.body
        if req.method == "POST" and connector is not None:
            try:
                body = peerapi.decode_transit_request(req.body)
            except BadRequest as e:
                # Answered as transit_ip_http would, without decoding the body a second time.
                return self._error(req, peer, e.status, str(e).strip())
            await self._resolve_fresh(connector, peer, body)

        stored: list[Mapping] = []
        now = self._node.now()

        def register(r: ConnectorTransitIPRequest) -> ConnectorTransitIPResponse:
            if connector is None:
                raise NotConfigured(NOT_CONNECTOR_MESSAGE)
            resp, new = connector.register(peer, r, now)
            stored.extend(new)
            self._note_refused_items(peer, r, resp)
            return resp

        status, answer = peerapi.transit_ip_http(req.method, body, register)
        if stored:
            self._node.install_connector_mappings(stored)
        if status != 200:
            allow = [("Allow", "POST")] if status == 405 else None
            return self._error(req, peer, status, answer.decode(errors="replace").strip(), allow)
        return Response(200, answer)

    def _note_refused_items(
        self, peer: Member, req: ConnectorTransitIPRequest, resp: ConnectorTransitIPResponse
    ) -> None:
        """Count refused items per code; one summary per code, never a line per item."""
        refused: dict[int, tuple[int, str]] = {}
        for item, result in zip(req.transit_ips, resp.transit_ips, strict=True):
            if result.code == peerapi.Code.OK:
                continue
            n, example = refused.get(result.code, (0, ""))
            if not example:
                example = (f"{item.transit_ip} -> {item.destination_ip} (app {item.app}, "
                           f"domain {item.domain}): {result.message}")
            refused[result.code] = (n + 1, example)
        for code, (n, example) in sorted(refused.items()):
            self.refusals.refuse(peer.name, _item_reason(code),
                                 f"transit-ip item refused, code {code}: {example}", count=n)

    async def _resolve_fresh(
        self, connector: ConnectorTable, peer: Member, req: ConnectorTransitIPRequest
    ) -> None:
        """Resolve the (app, domain) pairs whose destinations this connector has not seen."""
        pairs = connector.needs_resolution(peer, req, self._node.now())
        if not pairs:
            return
        # Only the families the request's destinations are in.
        families: dict[tuple[str, str], set[int]] = {pair: set() for pair in pairs}
        for item in req.transit_ips:
            if item.domain is not None and (item.app, item.domain) in families:
                families[(item.app, item.domain)].add(item.destination.version)
        limiter = trio.CapacityLimiter(RESOLVE_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            for (app, domain), versions in families.items():
                for v in sorted(versions):
                    nursery.start_soon(self._resolve, connector, peer, app, domain, v, limiter)

    async def _resolve(
        self,
        connector: ConnectorTable,
        peer: Member,
        app: str,
        domain: str,
        version: int,
        limiter: trio.CapacityLimiter,
    ) -> None:
        qtype = "A" if version == 4 else "AAAA"
        query = DNSRecord.question(domain, qtype).pack()
        async with limiter:
            try:
                answer = await self._node.forwarder.forward(bytes(query))
            except Exception as e:  # the item then fails its check, with a reason
                self._resolution_failed(peer, "transit-ip", domain, qtype,
                                        f"resolving for app {app} failed: {e}")
                return
        self._note_answer(peer, "transit-ip", connector, app, domain, qtype, answer)

    # -- dns-query ----------------------------------------------------------------

    async def _dns_query(self, req: Request, peer: Member) -> Response:
        if req.method != "POST":
            return self._error(req, peer, 405, "method must be POST", [("Allow", "POST")])
        content_type = req.header("content-type")
        if content_type is not None and content_type.split(b";")[0].strip() != DNS_MESSAGE.encode():
            return self._error(req, peer, 415, f"content type must be {DNS_MESSAGE}")
        names = req.query.get("app", [])
        if len(names) != 1 or not names[0]:
            return self._error(req, peer, 400, "exactly one app=NAME parameter is required")
        resolved = await self._resolve_for(peer, names[0], req.body)
        if isinstance(resolved, _Refusal):
            return self._error(req, peer, resolved.status, resolved.reason)
        return Response(200, resolved[1], DNS_MESSAGE)

    async def _resolve_offered(self, req: Request, peer: Member) -> Response:
        """Resolve each query and map its answer onto its offers, all in one exchange."""
        if req.method != "POST":
            return self._error(req, peer, 405, "method must be POST", [("Allow", "POST")])
        try:
            body = peerapi.decode_resolve_request(req.body)
        except BadRequest as e:
            return self._error(req, peer, e.status, str(e).strip())
        if len(body.queries) == 1:
            # A lone fresh name (the usual request): resolved in this task, without a
            # nursery's task start and the wake-up of its end on the answer's way.
            answers = [await self._resolve_and_map(req, peer, body.queries[0])]
            return Response(200, peerapi.encode(peerapi.ResolveResponse(answers)))
        answers = [peerapi.ResolveAnswer()] * len(body.queries)
        # A peer's request holds at most this many of the forwarder's upstream queries, so
        # a peer on all its connections cannot take every one of them from the others.
        limiter = trio.CapacityLimiter(RESOLVE_CONCURRENCY)

        async def one(i: int, q: peerapi.ResolveQuery) -> None:
            async with limiter:
                answers[i] = await self._resolve_and_map(req, peer, q)

        async with trio.open_nursery() as nursery:
            for i, q in enumerate(body.queries):
                nursery.start_soon(one, i, q)
        return Response(200, peerapi.encode(peerapi.ResolveResponse(answers)))

    async def _resolve_and_map(self, req: Request, peer: Member,
                               q: peerapi.ResolveQuery) -> peerapi.ResolveAnswer:
        resolved = await self._resolve_for(peer, q.app, q.query)
        if isinstance(resolved, _Refusal):
            self._count_refusal(req, peer, resolved.status, resolved.reason)
            return peerapi.ResolveAnswer(resolved.status, resolved.reason)
        domain, answer, addresses = resolved
        connector = self._node.connector
        if domain is None or not addresses or not (q.transit_ips or q.assigned) \
                or connector is None:
            return peerapi.ResolveAnswer(answer=answer)
        mappings = peerapi.offered_mappings(q.app, domain, addresses, q.offers,
                                            q.assigned_by_address)
        resp, stored = connector.register(peer, mappings, self._node.now())
        self._note_refused_items(peer, mappings, resp)
        if stored:
            self._node.install_connector_mappings(stored)
        return peerapi.ResolveAnswer(answer=answer,
                                     transit_ips=peerapi.mapped_results(mappings, resp))

    async def _resolve_for(
        self, peer: Member, app_name: str, query: bytes
    ) -> tuple[str | None, bytes, list[IPAddress]] | _Refusal:
        """Resolve ``query`` for a peer allowed to ask it: (its domain, the upstream's
        answer, the answer's addresses that are now acceptable destinations), or why not."""
        cfg = self._node.config
        # Before looking at the app, so that apps cannot be enumerated.
        if not cfg.may_use_apps(peer):
            return _Refusal(403, "peer is not allowed to use apps")
        connector = self._node.connector
        if connector is None or not connector.configured:
            return _Refusal(503, NOT_CONNECTOR_MESSAGE)
        app = cfg.app(app_name)
        if app is None or not cfg.serves(app):
            return _Refusal(404, f"app {app_name!r} is not served by this connector")
        try:
            question = query_question(query)
        except DNSMapError as e:
            return _Refusal(400, f"malformed DNS query: {e}")
        # The labels decide, as on the client: a name under the app's domain whose
        # other labels hold odd bytes is still the app's, and one label "a.b" is not two.
        if app not in cfg.apps_for_name(question.labels):
            return _Refusal(400, f"{question.shown} is not a domain of app {app.name!r}")
        try:
            answer = await self._node.forwarder.forward(query)
        except Exception as e:
            return _Refusal(502, f"upstream DNS failed for {question.shown}: {e}")
        try:
            domain = dnsname.from_labels(question.labels)
        except ValueError:
            # No text form, so no client can register a destination under it: nothing to note.
            return None, answer, []
        addresses = self._note_answer(peer, "dns-query", connector, app.name, domain,
                                      QTYPE.get(question.qtype), answer)
        return domain, answer, addresses

    def _note_answer(self, peer: Member, route: str, connector: ConnectorTable, app: str,
                     name: str, qtype: str, answer: bytes) -> list[IPAddress]:
        """Make the answer's addresses acceptable destinations for ``app``; returns them."""
        try:
            answered, _, addrs = answer_addresses(answer)
        except DNSMapError as e:
            self._resolution_failed(peer, route, name, qtype, f"upstream answer: {e}")
            return []
        if answered != name:
            self._resolution_failed(peer, route, name, qtype, f"upstream answered {answered}")
            return []
        if addrs:
            connector.note_resolution(app, name, addrs, self._node.now())
        return [a for a, _ in addrs]

    def _resolution_failed(self, peer: Member, route: str, name: str, qtype: str,
                           why: str) -> None:
        # A peer picks the names, one per item: a summary per peer, not a line per name.
        self.refusals.refuse(peer.name, "resolution_failed", f"{route}: {name} {qtype}: {why}",
                             level=logging.WARNING)

    # -- health ---------------------------------------------------------------------

    async def _health(self, req: Request, peer: Member) -> Response:
        if req.method not in ("GET", "HEAD"):
            return self._error(req, peer, 405, "method must be GET", [("Allow", "GET")])
        cfg = self._node.config
        health = HealthResponse(
            advertises_connector=cfg.advertise_connector,
            apps=sorted(a.name for a in cfg.own_apps),
            node=cfg.node.name,
        )
        return Response(200, peerapi.encode(health))
