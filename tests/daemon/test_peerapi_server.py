"""The peer API routes on a node stand-in made of the real core objects."""

import base64
import contextlib
import functools
import ipaddress
import json
import logging

import pytest
import trio
import trio.testing
from dnslib import AAAA, QTYPE, RR, A, DNSLabel, DNSRecord

from conn25.core import config, peerapi
from conn25.core.config import App, Member, NodeConfig, Tailnet
from conn25.core.connector import DEFAULT_BURST, ConnectorTable, Mapping
from conn25.core.peerapi import (
    DNS_QUERY_PATH,
    HEALTH_PATH,
    MAX_BODY,
    MAX_OFFERS,
    MAX_QUERIES,
    RESOLVE_PATH,
    TRANSIT_IP_PATH,
    Code,
    ResolveQuery,
    ResolveRequest,
)
from conn25.daemon import http
from conn25.daemon.http import Request
from conn25.daemon.peerapi_server import PEERAPI_LIMITS, RESOLVE_CONCURRENCY, PeerAPI
from nodekeys import public_key


def ip(text: str):
    return ipaddress.ip_address(text)


TAG = "tag:github-app-connector"
GITHUB = App("GitHub", ("github.com.", "*.github.com."), (TAG,))
GITLAB = App("GitLab", ("gitlab.com.",), ("tag:gitlab-connector",))  # known, not served here

LAPTOP = Member("laptop", (ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")), ("192.0.2.1", 41641),
                public_key("laptop"), user="alice@example.com")
INTRUDER = Member("intruder", (ip("100.64.0.4"),), ("192.0.2.4", 41641),
                  public_key("intruder"), user="eve@example.com")
CONNECTOR = Member("gh-connector-1", (ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")),
                 ("192.0.2.2", 41641), public_key("gh-connector-1"), tags=(TAG,))
LOOPBACK = Member("local-tester", (ip("127.0.0.1"),), ("192.0.2.9", 41641),
                  public_key("local-tester"), user="bob@example.com")
TAILNET = Tailnet(nodes=(LAPTOP, INTRUDER, CONNECTOR, LOOPBACK),
                  tag_owners={TAG: ("alice@example.com",)})

T4, T4B = "169.254.128.1", "169.254.128.2"
T6 = "fd7a:115c:a1e0:ab13::1"
REAL4, OTHER4, REAL6 = "203.0.113.10", "203.0.113.99", "2001:db8::10"


def node_config(*, advertise: bool = True, tailnet: Tailnet = TAILNET) -> NodeConfig:
    return NodeConfig(
        tailnet=tailnet,
        node=CONNECTOR,
        advertise_connector=advertise,
        apps=(GITHUB, GITLAB),
        pools=config.DEFAULT_POOLS,
        app_users=frozenset(n.name for n in tailnet.nodes) - {"intruder"},
    )


class FakeForwarder:
    """Answers from a fixed table, like an upstream resolver would; remembers the queries."""

    def __init__(self, answers: dict[tuple[str, str], list[tuple[str, int]]]) -> None:
        self.answers = answers
        self.queries: list[tuple[str, str]] = []
        self.fail: Exception | None = None

    async def forward(self, query: bytes) -> bytes:
        q = DNSRecord.parse(query)
        name, qtype = str(q.q.qname).lower(), QTYPE[q.q.qtype]
        self.queries.append((name, qtype))
        if self.fail is not None:
            raise self.fail
        reply = q.reply()
        for addr, ttl in self.answers.get((name, qtype), []):
            rdata = A(addr) if qtype == "A" else AAAA(addr)
            reply.add_answer(RR(q.q.qname, q.q.qtype, rdata=rdata, ttl=ttl))
        return bytes(reply.pack())


class FakeNode:
    """A PeerAPINode made of the real core objects, with a recording datapath hook."""

    def __init__(self, cfg: NodeConfig | None = None, *, connector: bool = True) -> None:
        self.config = cfg or node_config()
        self.connector = ConnectorTable(self.config) if connector else None
        self.forwarder = FakeForwarder({
            ("github.com.", "A"): [(REAL4, 300)],
            ("github.com.", "AAAA"): [(REAL6, 300)],
            ("api.github.com.", "A"): [("203.0.113.20", 60)],
        })
        self.time = 1000.0
        self.installed: list[list[Mapping]] = []

    def now(self) -> float:
        return self.time

    def install_connector_mappings(self, mappings) -> None:
        self.installed.append(list(mappings))


def request(method: str, target: str, body: bytes = b"", *, peer: str | None = "100.64.0.1",
            content_type: str | None = None) -> Request:
    headers = [(b"content-type", content_type.encode())] if content_type else []
    return Request(method, target, headers, body, None if peer is None else (peer, 40000))


def transit_body(*items: tuple) -> bytes:
    out = []
    for transit, dest, app, *domain in items:
        item = {"transitIP": transit, "destinationIP": dest, "app": app}
        if domain:
            item["domain"] = domain[0]
        out.append(item)
    return json.dumps({"transitIPs": out}).encode()


def dns_query(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


def call(node: FakeNode, req: Request) -> http.Response:
    async def main():
        return await PeerAPI(node).handle(req)

    return trio.run(main)


def register(node: FakeNode, *items: tuple, peer: str = "100.64.0.1") -> list[tuple[int, str]]:
    resp = call(node, request("POST", TRANSIT_IP_PATH, transit_body(*items), peer=peer))
    assert resp.status == 200, resp.body
    return [(r.code, r.message) for r in peerapi.decode_transit_response(resp.body).transit_ips]


def codes(results: list[tuple[int, str]]) -> list[int]:
    return [c for c, _ in results]


# -- transit-ip ----------------------------------------------------------------------


def test_item_with_domain_is_checked_against_a_fresh_resolution_and_installed():
    """The connector resolves the domain itself; the answered address is accepted."""
    node = FakeNode()
    assert codes(register(node, (T4, REAL4, "GitHub", "github.com"))) == [Code.OK]
    assert node.forwarder.queries == [("github.com.", "A")]
    assert node.installed == [[Mapping(ip("100.64.0.1"), ip(T4), ip(REAL4), "GitHub", 1000.0,
                                       "laptop")]]


def test_v6_item_resolves_aaaa_and_is_keyed_by_the_peers_v6_address():
    node = FakeNode()
    assert codes(register(node, (T6, REAL6, "GitHub", "github.com"))) == [Code.OK]
    assert node.forwarder.queries == [("github.com.", "AAAA")]
    (mapping,) = node.installed[0]
    assert mapping.peer == ip("fd7a:115c:a1e0::1")


def test_destination_the_domain_does_not_resolve_to_is_refused():
    """No open relay; code 1 with the reason, nothing installed."""
    node = FakeNode()
    ((code, message),) = register(node, (T4, OTHER4, "GitHub", "github.com"))
    assert code == Code.OTHER and "not an address" in message
    assert node.installed == []


def test_item_without_domain_and_never_resolved_is_refused_without_a_lookup():
    node = FakeNode()
    assert codes(register(node, (T4, REAL4, "GitHub"))) == [Code.OTHER]
    assert node.forwarder.queries == [] and node.installed == []


def test_known_destination_is_not_resolved_again():
    node = FakeNode()
    register(node, (T4, REAL4, "GitHub", "github.com"))
    assert codes(register(node, (T4B, REAL4, "GitHub", "github.com"))) == [Code.OK]
    assert node.forwarder.queries == [("github.com.", "A")]


def test_failed_fresh_resolution_fails_the_item_and_is_logged(caplog):
    caplog.set_level(logging.WARNING, logger="conn25.core.peerapi")
    node = FakeNode()
    node.forwarder.fail = OSError("upstream unreachable")
    assert codes(register(node, (T4, REAL4, "GitHub", "github.com"))) == [Code.OTHER]
    assert any("laptop" in r.getMessage() and "upstream unreachable" in r.getMessage()
               for r in caplog.records)


def test_per_item_codes_pass_through():
    """Permission before unknown app; one result per item, in order."""
    node = FakeNode()
    results = register(
        node,
        (T4, REAL4, "GitHub", "github.com"),
        (T4, REAL4, "GitHub", "github.com"),
        (T4B, REAL6, "GitHub"),
        ("169.254.128.3", REAL4, "Nope"),
    )
    assert codes(results) == [Code.OK, Code.DUPLICATE_TRANSIT_IP, Code.FAMILY_MISMATCH,
                              Code.UNKNOWN_APP]
    assert codes(register(node, (T4, REAL4, "GitHub"), peer="100.64.0.4")) == [
        Code.MISSING_PERMISSION]


@pytest.mark.parametrize(("method", "body", "status"), [
    ("GET", b"", 405),
    ("POST", b"{not json", 400),
    ("POST", b'{"transitIPs": [{"transitIP": "nope"}]}', 400),
    ("POST", b" " * (MAX_BODY + 1), 413),
])
def test_http_status_of_the_registration_passes_through(method, body, status):
    """One result per item, in request order. Not configured: 503. Not POST: 405. Malformed JSON:
    400. Body over 1 MiB: refused."""
    node = FakeNode()
    resp = call(node, request(method, TRANSIT_IP_PATH, body))
    assert resp.status == status
    assert resp.content_type.startswith("text/plain")
    if status == 405:
        assert ("Allow", "POST") in resp.headers
    assert node.installed == []


def test_registration_at_a_node_that_is_no_connector_gets_503():
    """Not configured."""
    resp = call(FakeNode(connector=False),
                request("POST", TRANSIT_IP_PATH, transit_body((T4, REAL4, "GitHub"))))
    assert resp.status == 503


@pytest.mark.parametrize("path", [TRANSIT_IP_PATH, DNS_QUERY_PATH + "?app=GitHub", RESOLVE_PATH,
                                  HEALTH_PATH])
def test_address_of_no_node_gets_403_on_every_route(path, caplog):
    caplog.set_level(logging.WARNING, logger="conn25.core.peerapi")
    node = FakeNode()
    resp = call(node, request("POST", path, b"{}", peer="100.64.9.9"))
    assert resp.status == 403
    assert any("100.64.9.9" in r.getMessage() and "403" in r.getMessage()
               for r in caplog.records)
    assert call(node, request("GET", path, peer=None)).status == 403


def test_ipv4_mapped_source_address_identifies_the_peer():
    node = FakeNode()
    assert codes(register(node, (T4, REAL4, "GitHub", "github.com"),
                          peer="::ffff:100.64.0.1")) == [Code.OK]


def test_unknown_path_is_404():
    assert call(FakeNode(), request("GET", "/v0/nothing")).status == 404


# -- dns-query -----------------------------------------------------------------------------


def dns_request(name: str = "github.com", app: str = "GitHub", *, peer: str = "100.64.0.1",
                qtype: str = "A") -> Request:
    return request("POST", f"{DNS_QUERY_PATH}?app={app}", dns_query(name, qtype), peer=peer,
                   content_type="application/dns-message")


def test_dns_query_returns_the_upstream_answer_and_allows_its_addresses():
    """An answer served here makes its address a valid destination, and only that one."""
    node = FakeNode()
    resp = call(node, dns_request())
    assert resp.status == 200 and resp.content_type == "application/dns-message"
    answer = DNSRecord.parse(resp.body)
    assert [str(rr.rdata) for rr in answer.rr] == [REAL4]
    # No domain in the registration: only what was served counts.
    assert codes(register(node, (T4, REAL4, "GitHub"), (T4B, OTHER4, "GitHub"))) == [
        Code.OK, Code.OTHER]
    assert node.forwarder.queries == [("github.com.", "A")]


def test_dns_query_for_a_wildcard_subdomain_is_served():
    node = FakeNode()
    resp = call(node, dns_request("API.GitHub.com"))
    assert resp.status == 200
    assert codes(register(node, (T4, "203.0.113.20", "GitHub"))) == [Code.OK]


def test_dns_answer_is_allowed_only_for_its_ttl():
    node = FakeNode()
    call(node, dns_request("api.github.com"))  # TTL 60
    node.time += 61
    assert codes(register(node, (T4, "203.0.113.20", "GitHub"))) == [Code.OTHER]


def test_peer_without_permission_gets_the_same_403_for_any_app():
    """Apps cannot be enumerated: a served app and a made-up one look alike."""
    node = FakeNode()
    served = call(node, dns_request(app="GitHub", peer="100.64.0.4"))
    made_up = call(node, dns_request(app="NoSuchApp", peer="100.64.0.4"))
    assert served.status == made_up.status == 403
    assert served.body == made_up.body
    assert node.forwarder.queries == []


@pytest.mark.parametrize("app", ["GitLab", "NoSuchApp"])
def test_app_not_served_here_is_404(app):
    node = FakeNode()
    assert call(node, dns_request("gitlab.com", app=app)).status == 404
    assert node.forwarder.queries == []


def test_name_outside_the_apps_domains_is_refused_without_a_lookup():
    node = FakeNode()
    resp = call(node, dns_request("example.com"))
    assert resp.status == 400 and b"not a domain of app" in resp.body
    assert call(node, dns_request("notgithub.com")).status == 400
    assert node.forwarder.queries == []


def odd_query(*labels: bytes) -> bytes:
    q = DNSRecord.question("x.invalid")
    q.q.qname = list(labels)
    return bytes(q.pack())


@pytest.mark.parametrize("odd", [b"x.y", b"\x01", b"@", b"a\x00b"])
def test_odd_name_under_the_apps_wildcard_is_the_apps(odd):
    """The connector decides on labels as the client does: served, but nothing is noted.

    The name has no text form, so no registration can name it; its addresses stay refused.
    """
    node = FakeNode()
    name = str(DNSLabel((odd, b"github", b"com"))).lower()  # as the fake upstream keys it
    node.forwarder.answers[(name, "A")] = [("203.0.113.77", 60)]
    resp = call(node, request("POST", f"{DNS_QUERY_PATH}?app=GitHub",
                              odd_query(odd, b"GitHub", b"com"), peer="100.64.0.1",
                              content_type="application/dns-message"))
    assert resp.status == 200
    assert node.forwarder.queries == [(name, "A")]
    assert codes(register(node, (T4, "203.0.113.77", "GitHub"))) == [Code.OTHER]


@pytest.mark.parametrize("labels", [(b"github.com",), (b"api.github", b"com")])
def test_name_that_only_prints_like_the_apps_is_refused(labels):
    """One label "github.com" is not the name github.com."""
    node = FakeNode()
    resp = call(node, request("POST", f"{DNS_QUERY_PATH}?app=GitHub", odd_query(*labels),
                              peer="100.64.0.1", content_type="application/dns-message"))
    assert resp.status == 400 and b"not a domain of app" in resp.body
    assert node.forwarder.queries == []


@pytest.mark.parametrize(("req", "status"), [
    (request("POST", f"{DNS_QUERY_PATH}?app=GitHub", b"\x00\x01garbage"), 400),
    (request("POST", f"{DNS_QUERY_PATH}?app=GitHub", b""), 400),
    (request("POST", f"{DNS_QUERY_PATH}?app=GitHub",
             bytes(DNSRecord.question("github.com").reply().pack())), 400),  # a response
    (request("POST", DNS_QUERY_PATH, dns_query("github.com")), 400),  # no app
    (request("POST", f"{DNS_QUERY_PATH}?app=GitHub&app=X", dns_query("github.com")), 400),
    (request("GET", f"{DNS_QUERY_PATH}?app=GitHub"), 405),
    (request("POST", f"{DNS_QUERY_PATH}?app=GitHub", dns_query("github.com"),
             content_type="application/json"), 415),
])
def test_bad_dns_query_requests_are_refused(req, status):
    node = FakeNode()
    assert call(node, req).status == status
    assert node.forwarder.queries == []


def test_dns_query_at_a_node_that_is_no_connector_gets_503():
    assert call(FakeNode(connector=False), dns_request()).status == 503


def test_dns_query_upstream_failure_is_502_and_allows_nothing():
    node = FakeNode()
    node.forwarder.fail = OSError("no upstream")
    assert call(node, dns_request()).status == 502
    assert codes(register(node, (T4, REAL4, "GitHub"))) == [Code.OTHER]


# -- resolve with offers ------------------------------------------------------------------------


def resolve(node: FakeNode, name: str = "github.com", offers: tuple[str, ...] = (T4, T4B), *,
            qtype: str = "A", app: str = "GitHub", peer: str = "100.64.0.1"
            ) -> tuple[list[str], list[tuple[str, str, int]]]:
    """(the answer's addresses, [(transit, destination, code)]) of a resolve request."""
    [out] = resolve_all(node, [ResolveQuery(app, dns_query(name, qtype), list(offers))], peer)
    assert out.status == 200, out.message
    return ([str(rr.rdata) for rr in DNSRecord.parse(out.answer).rr],
            [(r.transit_ip, r.destination_ip, r.code) for r in out.transit_ips])


def resolve_all(node: FakeNode, queries: list[ResolveQuery], peer: str = "100.64.0.1"
                ) -> list[peerapi.ResolveAnswer]:
    resp = call(node, request("POST", RESOLVE_PATH, peerapi.encode(ResolveRequest(queries)),
                              peer=peer))
    assert resp.status == 200, resp.body
    answers = peerapi.decode_resolve_response(resp.body).answers
    assert len(answers) == len(queries)
    return answers


def test_resolve_maps_the_answer_onto_the_offers_in_the_same_exchange():
    node = FakeNode()
    assert resolve(node) == ([REAL4], [(T4, REAL4, Code.OK)])
    [[m]] = node.installed
    assert (str(m.peer), str(m.transit), str(m.destination)) == ("100.64.0.1", T4, REAL4)
    # The mapping is the registration's: the same transit IP registered again is just refreshed.
    assert codes(register(node, (T4, REAL4, "GitHub"))) == [Code.OK]
    assert node.forwarder.queries == [("github.com.", "A")]


def test_resolve_maps_no_more_addresses_than_offered_and_only_of_their_family():
    node = FakeNode()
    many = [(f"203.0.113.{i}", 60) for i in (31, 32, 33)]
    node.forwarder.answers[("api.github.com.", "A")] = many
    addrs, results = resolve(node, "api.github.com", (T4, T6, T4B))
    assert addrs == [a for a, _ in many]
    assert results == [(T4, "203.0.113.31", Code.OK), (T4B, "203.0.113.32", Code.OK)]
    assert resolve(node, "github.com", (T6,))[1] == []  # an A answer: no v6 offer fits
    v6 = resolve(node, "github.com", (T4, T6), qtype="AAAA")
    assert v6 == ([REAL6], [(T6, REAL6, Code.OK)])
    assert str(node.installed[-1][0].peer) == "fd7a:115c:a1e0::1"


def test_an_address_the_client_assigned_already_keeps_its_transit_ip():
    node = FakeNode()
    q = ResolveQuery("GitHub", dns_query("github.com"), [T4B],
                     [peerapi.AssignedTransitIP(T4, REAL4)])
    [answer] = resolve_all(node, [q])
    assert [(r.transit_ip, r.destination_ip, r.code) for r in answer.transit_ips] == [
        (T4, REAL4, Code.OK)]
    assert [str(m.transit) for batch in node.installed for m in batch] == [T4]


def test_resolve_without_offers_only_answers():
    node = FakeNode()
    assert resolve(node, offers=()) == ([REAL4], [])
    assert node.installed == []
    # ... and its answer allows the address, as the dns-query route does.
    assert codes(register(node, (T4, REAL4, "GitHub"))) == [Code.OK]


def test_an_offer_the_connector_may_not_map_is_refused_per_item_with_the_registrations_code():
    node = FakeNode()
    assert resolve(node, offers=("100.64.0.9",)) == ([REAL4], [("100.64.0.9", REAL4, Code.OTHER)])
    assert node.installed == []
    # Registrations and resolutions share the peer's rate limit.
    many = [(f"203.0.113.{i}", 60) for i in range(40, 100)]
    node.forwarder.answers[("api.github.com.", "A")] = many
    limited = ok = 0
    for i in range(100):  # 6,000 items: over the burst
        offers = tuple(f"169.254.{130 + i}.{j}" for j in range(len(many)))
        results = resolve(node, "api.github.com", offers)[1]
        ok += sum(c == Code.OK for *_, c in results)
        limited += sum(c == Code.OTHER for *_, c in results)
        if limited:
            break
    assert ok == DEFAULT_BURST - 1 and limited > 0  # the refused offer above took one too


def query_body(*queries: dict) -> bytes:
    return json.dumps({"queries": list(queries)}).encode()


GOOD = {"app": "GitHub", "query": base64.b64encode(dns_query("github.com")).decode()}


@pytest.mark.parametrize(("body", "status"), [
    (b"{not json", 400),
    (b'{"queries": 7}', 400),
    (query_body({"app": "GitHub"}), 400),  # no query
    (query_body({"app": "GitHub", "query": "%%%"}), 400),  # not base64
    (query_body({**GOOD, "transitIPs": ["169.254.128.1", "169.254.128.1"]}), 400),  # twice
    (query_body({**GOOD, "transitIPs": ["not an address"]}), 400),
    (query_body({**GOOD, "transitIPs": [f"169.254.129.{i}" for i in range(MAX_OFFERS + 1)]}),
     400),
    (query_body(*[GOOD] * (MAX_QUERIES + 1)), 400),
    (b"x" * (MAX_BODY + 1), 413),
])
def test_bad_resolve_requests_are_refused_and_change_nothing(body, status):
    node = FakeNode()
    resp = call(node, request("POST", RESOLVE_PATH, body))
    assert resp.status == status, resp.body
    assert node.forwarder.queries == [] and node.installed == []


def test_each_query_of_a_request_is_answered_on_its_own_and_in_order():
    """A bad query of a batch gets the status the dns-query route would give it; the
    others are answered and mapped."""
    node = FakeNode()
    answers = resolve_all(node, [
        ResolveQuery("GitHub", dns_query("github.com"), [T4]),
        ResolveQuery("GitHub", b"\x00\x01garbage", [T4B]),
        ResolveQuery("GitHub", dns_query("example.com"), []),
        ResolveQuery("GitLab", dns_query("gitlab.com"), []),
        ResolveQuery("GitHub", dns_query("github.com", "AAAA"), [T6]),
    ])
    assert [a.status for a in answers] == [200, 400, 400, 404, 200]
    assert "not a domain of app" in answers[2].message
    assert [[(r.transit_ip, r.destination_ip) for r in a.transit_ips] for a in answers] == [
        [(T4, REAL4)], [], [], [], [(T6, REAL6)]]
    assert sorted(node.forwarder.queries) == [("github.com.", "A"), ("github.com.", "AAAA")]


def test_a_request_of_many_queries_holds_few_upstream_queries_at_once():
    """A hostile peer's 64-query requests must not take the forwarder's whole budget."""
    node = FakeNode()
    most = [0, 0]  # now, most
    forward = node.forwarder.forward

    async def counted(query: bytes) -> bytes:
        most[0] += 1
        most[1] = max(most[1], most[0])
        await trio.sleep(0.01)
        most[0] -= 1
        return await forward(query)

    node.forwarder.forward = counted  # type: ignore[method-assign]
    answers = resolve_all(node, [ResolveQuery("GitHub", dns_query(f"n{i}.github.com"))
                                 for i in range(MAX_QUERIES)])
    assert [a.status for a in answers] == [200] * MAX_QUERIES
    assert most[1] == RESOLVE_CONCURRENCY


def test_resolve_is_post_only_and_for_permitted_peers_only():
    node = FakeNode()
    q = ResolveQuery("GitHub", dns_query("github.com"), [T4])
    assert call(node, request("GET", RESOLVE_PATH)).status == 405
    denied, made_up = resolve_all(node, [q, ResolveQuery("NoSuchApp", b"", [T4])],
                                  peer="100.64.0.4")
    assert denied.status == made_up.status == 403 and denied.message == made_up.message
    [unserved] = resolve_all(FakeNode(connector=False), [q])
    assert unserved.status == 503
    assert node.forwarder.queries == [] and node.installed == []


# -- health ---------------------------------------------------------------------------------


def test_health_says_whether_it_advertises_and_for_which_apps():
    resp = call(FakeNode(), request("GET", HEALTH_PATH))
    assert resp.status == 200
    assert peerapi.decode_health(resp.body) == peerapi.HealthResponse(True, ["GitHub"],
                                                                      "gh-connector-1")
    plain = FakeNode(node_config(advertise=False), connector=False)
    assert peerapi.decode_health(call(plain, request("GET", HEALTH_PATH)).body) == (
        peerapi.HealthResponse(False, [], "gh-connector-1"))


def test_health_is_get_only():
    resp = call(FakeNode(), request("POST", HEALTH_PATH))
    assert resp.status == 405 and ("Allow", "GET") in resp.headers


# -- over HTTP ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(node: FakeNode):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(http.serve_tcp, "127.0.0.1", 0, PeerAPI(node).handle)
        yield port
        nursery.cancel_scope.cancel()


def test_over_http_the_source_address_is_the_identity():
    """127.0.0.1 is a node here, so its requests are served; elsewhere it gets 403."""
    node = FakeNode()
    stranger = FakeNode(node_config(tailnet=Tailnet(nodes=(LAPTOP, CONNECTOR))))

    async def main():
        async with serving(node) as port:
            status, body = await http.request("127.0.0.1", port, "GET", HEALTH_PATH, timeout=5)
            assert status == 200 and peerapi.decode_health(body).apps == ["GitHub"]
            status, body = await http.request(
                "127.0.0.1", port, "POST", f"{DNS_QUERY_PATH}?app=GitHub",
                dns_query("github.com"), timeout=5, content_type="application/dns-message")
            assert status == 200 and DNSRecord.parse(body).rr
            status, body = await http.request(
                "127.0.0.1", port, "POST", TRANSIT_IP_PATH,
                transit_body((T4, REAL4, "GitHub")), timeout=5)
            assert status == 200
            assert peerapi.decode_transit_response(body).transit_ips[0].code == Code.OK
        async with serving(stranger) as port:
            status, _ = await http.request("127.0.0.1", port, "GET", HEALTH_PATH, timeout=5)
            assert status == 403

    trio.run(main)
    assert node.installed[0][0].peer_name == "local-tester"


# -- per-peer limits and refusal summaries (one peer cannot starve the others) ----------------

OTHER_PEER = Member("other-tester", (ip("127.0.0.2"),), ("192.0.2.10", 41641),
                    public_key("other-tester"), user="alice@example.com")


class LineCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def counting_lines(name: str):
    logger = logging.getLogger(name)
    handler, level = LineCounter(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_thousands_of_refused_items_make_one_summary_line_and_are_counted():
    node = FakeNode()
    items = [(f"169.254.{128 + i // 250}.{i % 250 + 1}", REAL4, "GitHub") for i in range(5000)]
    api = PeerAPI(node)

    async def main():
        return await api.handle(request("POST", TRANSIT_IP_PATH, transit_body(*items),
                                        peer="100.64.0.4"))  # intruder: no permission

    with counting_lines("conn25") as lines:
        resp = trio.run(main)
        again = trio.run(main)
    assert resp.status == again.status == 200
    results = peerapi.decode_transit_response(resp.body).transit_ips
    # The first 500 meet the missing permission, the rest the per-peer rate limit.
    assert len(results) == 5000 and {r.code for r in results} == {Code.MISSING_PERMISSION,
                                                                  Code.OTHER}
    assert sum(api.refusals.counters.values()) == 10000
    assert set(api.refusals.counters) == {"transit_ip_code_1", "transit_ip_code_6"}
    # One line per kind of refusal, for both requests together.
    assert len(lines) == 2, lines[:5]
    assert all("intruder" in line and "more like it" in line for line in lines)


def test_one_peer_holding_its_maximum_connections_leaves_another_peer_served():
    """A peer that holds its maximum of idle connections (and keeps asking for more) does not
    keep another peer from its health check and resolution; an address of no node is closed
    without an answer."""
    cfg = node_config(tailnet=Tailnet(nodes=(*TAILNET.nodes, OTHER_PEER),
                                      tag_owners=TAILNET.tag_owners))
    node = FakeNode(cfg)
    api = PeerAPI(node)
    per_peer = PEERAPI_LIMITS.per_source
    assert per_peer is not None

    async def main():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(
                http.serve_tcp, "127.0.0.1", 0, api.handle, limits=PEERAPI_LIMITS,
                accept_source=api.is_peer, refusals=api.refusals, name="peerapi"))
            held = [await trio.open_tcp_stream("127.0.0.1", port)
                    for _ in range(per_peer.max_connections + 40)]
            await trio.testing.wait_all_tasks_blocked()
            assert api.refusals.counters["peerapi_connections_per_source"] == 40
            for _ in range(3):
                status, body = await http.request("127.0.0.1", port, "GET", HEALTH_PATH,
                                                  timeout=5, local_address="127.0.0.2")
                assert status == 200 and peerapi.decode_health(body).apps == ["GitHub"]
            status, body = await http.request(
                "127.0.0.1", port, "POST", f"{DNS_QUERY_PATH}?app=GitHub",
                dns_query("github.com"), timeout=5, content_type="application/dns-message",
                local_address="127.0.0.2")
            assert status == 200 and DNSRecord.parse(body).rr
            # Not a node: closed before any answer.
            stranger = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.3")
            with contextlib.suppress(trio.BrokenResourceError):
                await stranger.send_all(b"GET /v0/health HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stranger.receive_some(100) == b""
            assert api.refusals.counters["peerapi_not_peer"] == 1
            for s in [*held, stranger]:
                await s.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_only_other_nodes_are_peers():
    api = PeerAPI(FakeNode())
    assert api.is_peer("100.64.0.1") and api.is_peer("fd7a:115c:a1e0::1")
    assert api.is_peer("::ffff:100.64.0.1")
    assert not api.is_peer("100.64.0.2")  # this node itself
    assert not api.is_peer("100.64.9.9") and not api.is_peer("203.0.113.1")
    assert not api.is_peer("garbage")
