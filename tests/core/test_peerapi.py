"""Peer API messages, the request decoder and the transit-ip HTTP mapping."""

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conn25.core import peerapi
from conn25.core.peerapi import (
    MAX_BODY,
    BadRequest,
    BodyTooLarge,
    Code,
    ConnectorTransitIPRequest,
    ConnectorTransitIPResponse,
    HealthResponse,
    NotConfigured,
    TransitIPRequest,
    TransitIPResponse,
)


def body(*items: dict) -> bytes:
    return json.dumps({"transitIPs": list(items)}).encode()


ITEM = {"transitIP": "169.254.128.1", "destinationIP": "203.0.113.1", "app": "GitHub"}


def test_codes_have_upstream_numbers():
    assert [int(c) for c in Code] == [0, 1, 2, 3, 4, 5, 6]
    assert Code.MISSING_PERMISSION == 6 and Code.UNKNOWN_APP == 5


def test_request_encodes_with_upstream_field_names():
    """{transitIP, destinationIP, app}; our domain field only when set."""
    req = ConnectorTransitIPRequest([TransitIPRequest("169.254.128.1", "203.0.113.1", "GitHub")])
    assert json.loads(peerapi.encode(req)) == {"transitIPs": [ITEM]}
    req.transit_ips[0].domain = "github.com."
    assert json.loads(peerapi.encode(req))["transitIPs"][0]["domain"] == "github.com."


def test_request_round_trips_and_normalises():
    raw = body({"transitIP": "FD7A:115C:A1E0:AB13::0001", "destinationIP": "2001:DB8::1",
                "app": "GitHub", "domain": "API.GitHub.com"})
    req = peerapi.decode_transit_request(raw)
    (item,) = req.transit_ips
    assert item.transit_ip == "fd7a:115c:a1e0:ab13::1"
    assert item.destination_ip == "2001:db8::1"
    assert item.domain == "api.github.com."
    assert item.transit.version == 6 and str(item.destination) == "2001:db8::1"
    assert peerapi.decode_transit_request(peerapi.encode(req)) == req


def test_unknown_fields_are_ignored():
    req = peerapi.decode_transit_request(body({**ITEM, "future": 1}))
    assert req.transit_ips[0].app == "GitHub"


@pytest.mark.parametrize("raw", [b'{"transitIPs": []}', b"{}"])
def test_empty_request_is_valid_and_empty(raw):
    """As upstream: no items, no results (not an error)."""
    assert peerapi.decode_transit_request(raw).transit_ips == []


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "truncated"),
        (b'{"transitIPs": [{"transitIP": "169.254', "truncated"),
        (b"not json", "malformed"),
        (b"[]", "Expected `object`, got `array`"),
        (b'{"transitIPs": {}}', "$.transitIPs"),
        (body({**ITEM, "app": 5}), "$.transitIPs[0].app"),
        (body({**ITEM, "transitIP": 1}), "$.transitIPs[0].transitIP"),
        (body({"transitIP": "169.254.128.1", "app": "GitHub"}), "destinationIP"),
        (body(ITEM, {**ITEM, "transitIP": "169.254.128.300"}), "'169.254.128.300' is not an IP"),
        (body({**ITEM, "destinationIP": "github.com"}), "'github.com' is not an IP address"),
        (body({**ITEM, "destinationIP": "203.0.113.0/24"}), "not an IP address"),
        (body({**ITEM, "domain": "bad..name"}), "not a valid domain name"),
        (body({**ITEM, "domain": 7}), "$.transitIPs[0].domain"),
    ],
)
def test_bad_requests_say_what_and_where(raw, needle):
    with pytest.raises(BadRequest) as e:
        peerapi.decode_transit_request(raw)
    assert e.value.status == 400
    assert needle in str(e.value)
    assert str(e.value).startswith("transit-ip request: ")


@given(st.binary(max_size=200) | st.from_regex(rb'\A\{"transitIPs": \[\{.{0,80}', fullmatch=True))
def test_any_body_decodes_or_raises_bad_request(raw):
    """Arbitrary bytes never escape as anything but BadRequest (400, not a crash)."""
    try:
        peerapi.decode_transit_request(raw)
    except BadRequest as e:
        assert e.status == 400


def test_bad_ip_error_names_the_item():
    with pytest.raises(BadRequest, match=r"\$\.transitIPs\[1\]"):
        peerapi.decode_transit_request(body(ITEM, {**ITEM, "transitIP": "x"}))


def test_body_over_one_mib_is_refused():
    """Over 1 MiB is refused (413), exactly 1 MiB is read."""
    raw = body(ITEM)
    exact = raw + b" " * (MAX_BODY - len(raw))
    assert len(peerapi.decode_transit_request(exact).transit_ips) == 1
    with pytest.raises(BodyTooLarge, match="over the 1048576 byte limit") as e:
        peerapi.decode_transit_request(exact + b" ")
    assert e.value.status == 413


def test_building_a_request_with_bad_text_fails_at_once():
    with pytest.raises(ValueError, match="is not an IP address"):
        TransitIPRequest("nope", "203.0.113.1", "GitHub")


def test_response_decodes_upstream_omitted_zeros():
    """Upstream omits code 0 and empty messages; those mean OK."""
    resp = peerapi.decode_transit_response(
        b'{"transitIPs": [{}, {"code": 5, "message": "unknown app"}, {"code": 99}]}'
    )
    assert [r.code for r in resp.transit_ips] == [Code.OK, Code.UNKNOWN_APP, 99]
    assert resp.transit_ips[1].message == "unknown app"
    assert peerapi.decode_transit_response(b"{}").transit_ips == []
    with pytest.raises(BadRequest, match="transit-ip response"):
        peerapi.decode_transit_response(b'{"transitIPs": [{"code": "0"}]}')


def test_response_encodes_code_and_message():
    resp = ConnectorTransitIPResponse([TransitIPResponse(), TransitIPResponse(Code.OTHER, "why")])
    assert json.loads(peerapi.encode(resp)) == {
        "transitIPs": [{"code": 0, "message": ""}, {"code": 1, "message": "why"}]
    }


def test_health_round_trip_uses_camel_case():
    h = HealthResponse(advertises_connector=True, apps=["GitHub"], node="gh-connector-1")
    assert json.loads(peerapi.encode(h)) == {
        "advertisesConnector": True, "apps": ["GitHub"], "node": "gh-connector-1"
    }
    assert peerapi.decode_health(peerapi.encode(h)) == h
    with pytest.raises(BadRequest, match="advertisesConnector"):
        peerapi.decode_health(b'{"apps": [], "node": "x"}')


def test_paths():
    assert peerapi.TRANSIT_IP_PATH == "/v0/connector/transit-ip"
    assert peerapi.DNS_QUERY_PATH == "/dns-query"
    assert peerapi.HEALTH_PATH == "/v0/health"


# -- the HTTP mapping ---------------------------------------------------


class Recorder:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[ConnectorTransitIPRequest] = []
        self.fail = fail

    def __call__(self, req: ConnectorTransitIPRequest) -> ConnectorTransitIPResponse:
        self.calls.append(req)
        if self.fail is not None:
            raise self.fail
        return ConnectorTransitIPResponse([TransitIPResponse() for _ in req.transit_ips])


def test_http_post_answers_200_with_one_result_per_item():
    h = Recorder()
    raw = body(ITEM, {**ITEM, "transitIP": "169.254.128.2"})
    status, out = peerapi.transit_ip_http("POST", raw, h)
    assert status == 200
    assert len(peerapi.decode_transit_response(out).transit_ips) == 2
    assert len(h.calls) == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD", "post"])
def test_http_other_methods_are_405(method):
    h = Recorder()
    assert peerapi.transit_ip_http(method, body(ITEM), h)[0] == 405
    assert h.calls == []


def test_http_malformed_is_400_and_handler_not_called():
    h = Recorder()
    status, out = peerapi.transit_ip_http("POST", b"{", h)
    assert status == 400 and b"truncated" in out
    assert h.calls == []


def test_http_too_big_is_413():
    h = Recorder()
    status, _ = peerapi.transit_ip_http("POST", b" " * (MAX_BODY + 1), h)
    assert status == 413 and h.calls == []


def test_http_not_configured_is_503():
    status, out = peerapi.transit_ip_http("POST", body(ITEM), Recorder(NotConfigured("x")))
    assert status == 503 and b"not a connector" in out


# -- resolution with offers ---------------------------------------------------------------------


def addrs(*texts: str) -> list:
    return [ipaddress.ip_address(t) for t in texts]


def test_resolve_request_round_trips_with_the_query_as_base64():
    q = peerapi.ResolveQuery("GitHub", b"\x12\x34", ["169.254.128.1", "FD7A:115C:A1E0:AB13::1"])
    wire = peerapi.encode(peerapi.ResolveRequest([q]))
    assert json.loads(wire) == {"queries": [{
        "app": "GitHub", "query": "EjQ=",
        "transitIPs": ["169.254.128.1", "fd7a:115c:a1e0:ab13::1"]}]}
    assert peerapi.decode_resolve_request(wire).queries == [q]
    assert q.offers == addrs("169.254.128.1", "fd7a:115c:a1e0:ab13::1")
    answer = peerapi.ResolveAnswer(answer=b"\x01", transit_ips=[
        peerapi.MappedTransitIP("169.254.128.1", "203.0.113.1")])
    wire = peerapi.encode(peerapi.ResolveResponse([answer, peerapi.ResolveAnswer(404, "no")]))
    assert json.loads(wire) == {"answers": [
        {"answer": "AQ==", "transitIPs": [{"transitIP": "169.254.128.1",
                                          "destinationIP": "203.0.113.1"}]},
        {"status": 404, "message": "no"}]}
    assert peerapi.decode_resolve_response(wire).answers[0] == answer


@pytest.mark.parametrize(("offers", "message"), [
    (["169.254.128.1", "169.254.128.01"], "not an IP address"),
    (["169.254.128.1", "169.254.128.1"], "more than once"),
    ([f"169.254.129.{i}" for i in range(peerapi.MAX_OFFERS + 1)], "at most 64"),
])
def test_resolve_request_refuses_bad_offers_saying_why(offers, message):
    body = json.dumps({"queries": [{"app": "GitHub", "query": "", "transitIPs": offers}]}).encode()
    with pytest.raises(BadRequest, match=message):
        peerapi.decode_resolve_request(body)


def test_offered_mappings_pair_each_address_with_the_next_offer_of_its_family():
    req = peerapi.offered_mappings(
        "GitHub", "github.com.", addrs("203.0.113.1", "2001:db8::1", "203.0.113.2", "203.0.113.3"),
        addrs("169.254.128.1", "fd7a:115c:a1e0:ab13::1", "169.254.128.2"))
    assert [(i.transit_ip, i.destination_ip, i.app, i.domain) for i in req.transit_ips] == [
        ("169.254.128.1", "203.0.113.1", "GitHub", "github.com."),
        ("fd7a:115c:a1e0:ab13::1", "2001:db8::1", "GitHub", "github.com."),
        ("169.254.128.2", "203.0.113.2", "GitHub", "github.com."),
    ]


def test_acknowledged_takes_only_ok_results_for_our_offers_each_once():
    M = peerapi.MappedTransitIP
    offers = addrs("169.254.128.1", "169.254.128.2", "169.254.128.3", "fd7a:115c:a1e0:ab13::1")
    resp = peerapi.ResolveAnswer(answer=b"", transit_ips=[
        M("169.254.128.1", "203.0.113.1"),
        M("169.254.128.2", "203.0.113.2", Code.OTHER, "not resolved here"),
        M("169.254.128.9", "203.0.113.3"),  # not offered
        M("169.254.128.1", "203.0.113.4"),  # an offer again
        M("169.254.128.3", "203.0.113.1"),  # an address again
        M("fd7a:115c:a1e0:ab13::1", "203.0.113.5"),  # families differ
        M("bogus", "203.0.113.6"),
        M("169.254.128.3", "203.0.113.7"),
    ])
    assert peerapi.acknowledged(resp, offers) == {
        ipaddress.ip_address("203.0.113.1"): ipaddress.ip_address("169.254.128.1"),
        ipaddress.ip_address("203.0.113.7"): ipaddress.ip_address("169.254.128.3"),
    }


def test_an_address_the_client_assigned_already_is_mapped_onto_that_transit_ip_again():
    """So that a peer's address never gets a second transit IP the client does not know
    (its replies would be sent to that one after a connector restart)."""
    req = peerapi.offered_mappings(
        "GitHub", "github.com.", addrs("203.0.113.1", "203.0.113.2"),
        addrs("169.254.128.5", "169.254.128.6"),
        {ipaddress.ip_address("203.0.113.2"): ipaddress.ip_address("169.254.128.9")})
    assert [(i.transit_ip, i.destination_ip) for i in req.transit_ips] == [
        ("169.254.128.5", "203.0.113.1"), ("169.254.128.9", "203.0.113.2")]


def test_a_transit_ip_both_offered_and_assigned_is_refused():
    body = json.dumps({"queries": [{
        "app": "GitHub", "query": "", "transitIPs": ["169.254.128.1"],
        "assigned": [{"transitIP": "169.254.128.1", "destinationIP": "203.0.113.1"}]}]})
    with pytest.raises(BadRequest, match="more than once"):
        peerapi.decode_resolve_request(body.encode())
