"""Peer API messages: the transit-IP registration, resolution with offers, the health answer.

Wire names follow upstream conn25 (``transitIP``, ``destinationIP``, ...) so
that the JSON is the same; ``domain`` is our extension, omitted when unset.
Addresses travel as text (msgspec cannot encode ``ipaddress`` objects): a
:class:`TransitIPRequest` checks and canonicalises its text when it is built
or decoded, and hands out typed addresses through properties.

:func:`transit_ip_http` is the whole HTTP behaviour of the registration
endpoint minus the sockets, so the server that comes later stays a thin
adapter.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import msgspec

from . import dnsname
from .iprange import IPAddress, canonical_address, parse_address

TRANSIT_IP_PATH = "/v0/connector/transit-ip"
RESOLVE_PATH = "/v0/connector/resolve"
DNS_QUERY_PATH = "/dns-query"
HEALTH_PATH = "/v0/health"

# Upstream refuses request bodies over 1 MiB.
MAX_BODY = 1 << 20
# Transit IPs one resolution may offer: more than a DNS answer's addresses need.
MAX_OFFERS = 64
# Queries in one resolve request (a burst of fresh names shares requests).
MAX_QUERIES = 64


class Code(enum.IntEnum):
    """Per-item outcome of a transit-IP registration (upstream numbering)."""

    OK = 0
    OTHER = 1
    DUPLICATE_TRANSIT_IP = 2
    NO_PEER_FAMILY = 3
    FAMILY_MISMATCH = 4
    UNKNOWN_APP = 5
    MISSING_PERMISSION = 6


class BadRequest(ValueError):
    """A request body the endpoint refuses; ``status`` is the HTTP status to answer."""

    status = 400


class BodyTooLarge(BadRequest):
    status = 413


class NotConfigured(Exception):
    """Raised by a handler when this node is not a connector for any app (HTTP 503)."""


class TransitIPRequest(msgspec.Struct, omit_defaults=True):
    """One mapping a client asks for: packets to ``transitIP`` go to ``destinationIP``."""

    transit_ip: str = msgspec.field(name="transitIP")
    destination_ip: str = msgspec.field(name="destinationIP")
    app: str
    # Our extension: the name the client resolved, so that the connector can
    # check the destination against its own resolution of it.
    domain: str | None = None

    def __post_init__(self) -> None:
        # Runs on construction and on decode; msgspec reports a ValueError
        # here with the item's path in the document.
        self.transit_ip = canonical_address(self.transit_ip)
        self.destination_ip = canonical_address(self.destination_ip)
        if self.domain is not None:
            self.domain = dnsname.normalize(self.domain)

    @property
    def transit(self) -> IPAddress:
        return parse_address(self.transit_ip)

    @property
    def destination(self) -> IPAddress:
        return parse_address(self.destination_ip)


class ConnectorTransitIPRequest(msgspec.Struct):
    transit_ips: list[TransitIPRequest] = msgspec.field(name="transitIPs", default_factory=list)


class TransitIPResponse(msgspec.Struct):
    # Plain int on the wire so that a code from a newer peer still decodes;
    # compare it with Code members.
    code: int = Code.OK
    message: str = ""


class ConnectorTransitIPResponse(msgspec.Struct):
    """One result per request item, in request order."""

    transit_ips: list[TransitIPResponse] = msgspec.field(name="transitIPs", default_factory=list)


class AssignedTransitIP(msgspec.Struct):
    """A transit IP the client gave an address of the queried name already."""

    transit_ip: str = msgspec.field(name="transitIP")
    destination_ip: str = msgspec.field(name="destinationIP")

    def __post_init__(self) -> None:
        self.transit_ip = canonical_address(self.transit_ip)
        self.destination_ip = canonical_address(self.destination_ip)


class ResolveQuery(msgspec.Struct, omit_defaults=True):
    """A DNS query for ``app`` and the transit IPs the connector may map its answer onto.

    The connector resolves ``query`` (DNS wire format), maps each address of
    the answer, in answer order, onto the next offer of its family, and
    answers with the DNS response and one result per mapping it tried: a
    fresh name costs the client one round trip, and its first packet finds
    the mapping in place. Offers the answer does not need stay unmapped.
    """

    app: str
    query: bytes  # base64 in JSON
    transit_ips: list[str] = msgspec.field(name="transitIPs", default_factory=list)
    # The name's addresses that have a transit IP already: an answer that still holds
    # one is mapped onto that transit IP again (refreshed), not onto an offer, so that
    # no address of the peer's gets a second transit IP it would not know of.
    assigned: list[AssignedTransitIP] = []

    def __post_init__(self) -> None:
        if len(self.transit_ips) + len(self.assigned) > MAX_OFFERS:
            raise ValueError(f"{len(self.transit_ips) + len(self.assigned)} transit IPs "
                             f"offered or assigned, at most {MAX_OFFERS} may be")
        self.transit_ips = [canonical_address(t) for t in self.transit_ips]
        named = self.transit_ips + [a.transit_ip for a in self.assigned]
        if len(set(named)) != len(named):
            raise ValueError("a transit IP is offered or assigned more than once")

    @property
    def offers(self) -> list[IPAddress]:
        return [parse_address(t) for t in self.transit_ips]

    @property
    def assigned_by_address(self) -> dict[IPAddress, IPAddress]:
        """real address -> its transit IP, from ``assigned``."""
        return {parse_address(a.destination_ip): parse_address(a.transit_ip)
                for a in self.assigned}


class ResolveRequest(msgspec.Struct):
    """Queries that were waiting for the same connector, answered in one exchange."""

    queries: list[ResolveQuery]

    def __post_init__(self) -> None:
        if len(self.queries) > MAX_QUERIES:
            raise ValueError(f"{len(self.queries)} queries, at most {MAX_QUERIES} may be")


class MappedTransitIP(msgspec.Struct, omit_defaults=True):
    """What became of one offer: mapped to ``destinationIP`` (code OK) or refused."""

    transit_ip: str = msgspec.field(name="transitIP")
    destination_ip: str = msgspec.field(name="destinationIP")
    code: int = Code.OK
    message: str = ""


class ResolveAnswer(msgspec.Struct, omit_defaults=True):
    """The outcome of one query: ``status`` as the dns-query endpoint would answer it
    (200, or 400, 403, 404, 502, 503 with ``message``), the DNS response, the mappings."""

    status: int = 200
    message: str = ""
    answer: bytes = b""  # the DNS response, wire format (base64 in JSON)
    transit_ips: list[MappedTransitIP] = msgspec.field(name="transitIPs", default_factory=list)


class ResolveResponse(msgspec.Struct):
    """One answer per query, in request order."""

    answers: list[ResolveAnswer]


class HealthResponse(msgspec.Struct):
    """What ``GET /v0/health`` answers; clients pick connectors by it."""

    advertises_connector: bool = msgspec.field(name="advertisesConnector")
    apps: list[str]
    node: str


Message = (
    TransitIPRequest
    | ConnectorTransitIPRequest
    | TransitIPResponse
    | ConnectorTransitIPResponse
    | AssignedTransitIP
    | ResolveQuery
    | ResolveRequest
    | ResolveAnswer
    | ResolveResponse
    | HealthResponse
)

_T = TypeVar("_T")

_request_decoder = msgspec.json.Decoder(ConnectorTransitIPRequest)
_response_decoder = msgspec.json.Decoder(ConnectorTransitIPResponse)
_health_decoder = msgspec.json.Decoder(HealthResponse)
_resolve_request_decoder = msgspec.json.Decoder(ResolveRequest)
_resolve_response_decoder = msgspec.json.Decoder(ResolveResponse)
_encoder = msgspec.json.Encoder()


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes, what: str) -> _T:
    if len(body) > MAX_BODY:
        raise BodyTooLarge(f"{what}: body of {len(body)} bytes is over the {MAX_BODY} byte limit")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as e:
        # ValidationError is a DecodeError; both messages say what and where.
        raise BadRequest(f"{what}: {e}") from None


def decode_transit_request(body: bytes) -> ConnectorTransitIPRequest:
    """Decode a registration body; BadRequest (BodyTooLarge over MAX_BODY) says what is wrong.

    An empty list (or no list) is valid and gets an empty list of results,
    as upstream.
    """
    return _decode(_request_decoder, body, "transit-ip request")


def decode_transit_response(body: bytes) -> ConnectorTransitIPResponse:
    """Decode a connector's answer; absent code/message mean OK/"" (upstream omits zeros)."""
    return _decode(_response_decoder, body, "transit-ip response")


def decode_health(body: bytes) -> HealthResponse:
    return _decode(_health_decoder, body, "health response")


def decode_resolve_request(body: bytes) -> ResolveRequest:
    return _decode(_resolve_request_decoder, body, "resolve request")


def decode_resolve_response(body: bytes) -> ResolveResponse:
    return _decode(_resolve_response_decoder, body, "resolve response")


def offered_mappings(app: str, domain: str, addresses: Sequence[IPAddress],
                     offers: Sequence[IPAddress],
                     assigned: Mapping[IPAddress, IPAddress] | None = None,
                     ) -> ConnectorTransitIPRequest:
    """The registration a connector makes of its answer: each address, in answer order,
    onto the transit IP the client ``assigned`` it already (real -> transit), else onto
    the next unused offer of its family; addresses beyond the offers stay unmapped (the
    client registers those itself)."""
    assigned = assigned or {}
    spare: dict[int, list[IPAddress]] = {v: [o for o in offers if o.version == v] for v in (4, 6)}
    items = []
    for addr in addresses:
        transit = assigned.get(addr)
        if transit is None and spare[addr.version]:
            transit = spare[addr.version].pop(0)
        if transit is not None:
            items.append(TransitIPRequest(str(transit), str(addr), app, domain))
    return ConnectorTransitIPRequest(items)


def mapped_results(req: ConnectorTransitIPRequest,
                   resp: ConnectorTransitIPResponse) -> list[MappedTransitIP]:
    """A registration's per-item results as a resolution answers them."""
    return [MappedTransitIP(item.transit_ip, item.destination_ip, r.code, r.message)
            for item, r in zip(req.transit_ips, resp.transit_ips, strict=True)]


def acknowledged(resp: ResolveAnswer, offers: Iterable[IPAddress]) -> dict[IPAddress, IPAddress]:
    """real address -> transit IP, for each mapping the connector made of one of ``offers``
    (the transit IPs offered and those assigned already).

    A connector's answer is input like any other: results for transit IPs we
    did not offer, of mixed families, or naming an offer or an address twice
    are left out (so those addresses are registered the ordinary way).
    """
    offered = set(offers)
    out: dict[IPAddress, IPAddress] = {}
    used: set[IPAddress] = set()
    for r in resp.transit_ips:
        if r.code != Code.OK:
            continue
        try:
            transit, real = parse_address(r.transit_ip), parse_address(r.destination_ip)
        except ValueError:
            continue
        if (transit not in offered or transit in used or real in out
                or transit.version != real.version):
            continue
        out[real] = transit
        used.add(transit)
    return out


TransitHandler = Callable[[ConnectorTransitIPRequest], ConnectorTransitIPResponse]


def transit_ip_http(
    method: str, body: bytes | ConnectorTransitIPRequest, handler: TransitHandler
) -> tuple[int, bytes]:
    """HTTP status and body for a request to TRANSIT_IP_PATH.

    ``body`` may already be decoded (a server that looked at the items first
    need not decode them twice).

    ``handler`` is bound to the requesting peer (and the time) by the server;
    it raises NotConfigured when this node serves no app. Non-200 bodies are
    one line of text; a 405 answer should carry ``Allow: POST``.
    """
    if method != "POST":
        return 405, b"method must be POST\n"
    try:
        req = body if isinstance(body, ConnectorTransitIPRequest) else decode_transit_request(body)
        resp = handler(req)
    except BadRequest as e:
        return e.status, f"{e}\n".encode()
    except NotConfigured:
        return 503, b"this node is not a connector for any app\n"
    return 200, encode(resp)
