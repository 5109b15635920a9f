"""Peer API messages: the transit-IP registration and the health answer.

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
from collections.abc import Callable
from typing import TypeVar

import msgspec

from . import dnsname
from .iprange import IPAddress, parse_address

TRANSIT_IP_PATH = "/v0/connector/transit-ip"
DNS_QUERY_PATH = "/dns-query"
HEALTH_PATH = "/v0/health"

# Upstream refuses request bodies over 1 MiB.
MAX_BODY = 1 << 20


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
        self.transit_ip = str(parse_address(self.transit_ip))
        self.destination_ip = str(parse_address(self.destination_ip))
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
    | HealthResponse
)

_T = TypeVar("_T")

_request_decoder = msgspec.json.Decoder(ConnectorTransitIPRequest)
_response_decoder = msgspec.json.Decoder(ConnectorTransitIPResponse)
_health_decoder = msgspec.json.Decoder(HealthResponse)
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
