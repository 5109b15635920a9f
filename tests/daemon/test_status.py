"""The status document and its text table."""

from __future__ import annotations

import ipaddress

import msgspec
import trio
from test_registration import (
    C1,
    C2,
    GITHUB,
    LAPTOP,
    T0,
    TAG,
    FakeNode,
    FakePeers,
    client_config,
    run,
)

from conn25.core.config import App
from conn25.core.connector import ConnectorTable
from conn25.core.peerapi import ConnectorTransitIPRequest, HealthResponse, TransitIPRequest
from conn25.daemon.registration import Registrar
from conn25.daemon.status import domain_order, render_table, status_document

ALPHA = App("Alpha", ("alpha.example.",), (TAG,))
WIDE = App("GitHub", ("github.com.", "*.github.com.", "githubassets.com."), (TAG,))
SERVED = App("Served", ("served.example.",), ("tag:served",))


def ip(text: str):
    return ipaddress.ip_address(text)


def client_node(apps: tuple[App, ...] = (WIDE, ALPHA)) -> FakeNode:
    node = FakeNode(client_config(apps=apps))
    peers = FakePeers()
    node.registrar = Registrar(node, post=peers.post, get=peers.get)
    node.peers = peers  # type: ignore[attr-defined]
    return node


def addresses(doc: dict, app: str, domain: str) -> list[dict]:
    [a] = [a for a in doc["client"]["apps"] if a["name"] == app]
    [d] = [d for d in a["domains"] if d["domain"] == domain]
    return d["addresses"]


def test_not_configured_is_just_that():
    """{configured: false}."""
    node = client_node(apps=())
    doc = status_document(node)
    assert doc == {"configured": False}
    assert "not configured" in render_table(doc)


def test_apps_by_name_domains_parents_first_addresses_by_flows_then_real():
    """The order rules of the client view."""
    node = client_node()
    for domain in ["gist.github.com.", "a.b.github.com.", "githubassets.com.", "github.com.",
                   "b.github.com.", "api.github.com."]:
        node.reserve(domain, "203.0.113.50")
    node.reserve("alpha.example.", "203.0.113.60", app="Alpha")
    for real, flows in [("203.0.113.10", 0), ("203.0.113.9", 0), ("2001:db8::1", 0),
                        ("203.0.113.200", 3), ("2001:db8::2", 1)]:
        node.reserve("github.com.", real, flows)
    doc = status_document(node)
    assert [a["name"] for a in doc["client"]["apps"]] == ["Alpha", "GitHub"]
    [_, github] = doc["client"]["apps"]
    assert [d["domain"] for d in github["domains"]] == [
        "github.com.", "api.github.com.", "b.github.com.", "a.b.github.com.",
        "gist.github.com.", "githubassets.com.",
    ]
    reals = [a["real"] for a in addresses(doc, "GitHub", "github.com.")]
    # Most flows first; then by address as a number (.9 before .10), IPv4 before IPv6.
    assert reals == ["203.0.113.200", "2001:db8::2", "203.0.113.9", "203.0.113.10",
                     "203.0.113.50", "2001:db8::1"]


def test_domain_order_puts_parents_before_children():
    names = ["x.example.com.", "example.com.", "a.x.example.com.", "b.example.com.", "com."]
    assert sorted(names, key=domain_order) == [
        "com.", "example.com.", "b.example.com.", "x.example.com.", "a.x.example.com."]


def test_an_address_shows_magic_transit_real_app_domain_expiry_flows_connector():
    node = client_node()
    a = node.reserve("api.github.com.", "203.0.113.7", flows=2)
    node.assignments.attach(a.transit, C1.name)
    [entry] = addresses(status_document(node), "GitHub", "api.github.com.")
    assert entry == {
        "magic": str(a.magic), "transit": str(a.transit), "real": "203.0.113.7",
        "app": "GitHub", "domain": "api.github.com.", "expiry": T0 + 300,
        "activeFlows": 2, "connector": C1.name,
    }


def test_pools_show_in_use_and_capacity_per_family():
    node = client_node()
    node.reserve("github.com.", "203.0.113.1")
    node.reserve("github.com.", "2001:db8::1")
    node.reserve("github.com.", "2001:db8::2")
    pools = status_document(node)["client"]["pools"]
    assert pools == node.assignments.pool_usage()
    assert pools["v4Magic"]["inUse"] == 1 and pools["v6Transit"]["inUse"] == 2
    assert pools["v4Magic"]["capacity"] == 65536


def test_apps_without_assignments_and_the_chosen_connector_are_listed():
    node = client_node()
    peers = node.peers

    async def main():
        peers.health["100.64.0.2"] = HealthResponse(False, [], C1.name)
        await node.registrar.check_health()

    run(main)
    doc = status_document(node)
    [alpha, github] = doc["client"]["apps"]
    assert alpha["domains"] == [] and github["domains"] == []
    assert github["connector"] == C2.name
    assert github["candidates"] == [{"name": C1.name, "healthy": False},
                                    {"name": C2.name, "healthy": True}]
    assert doc["connectorHealth"][C1.name]["advertisesConnector"] is False


def test_the_connector_view_lists_peers_and_their_mappings():
    """Connector view: peers, their apps and transit -> destination."""
    cfg = client_config(apps=(GITHUB, SERVED), node=C1, advertise=True)
    node = FakeNode(cfg)
    node.registrar = Registrar(node)
    table = node.connector = ConnectorTable(cfg)
    # C1 carries the GitHub tag: it serves GitHub, and maps only Served as a client.
    table.note_resolution("GitHub", "github.com.", [(ip("203.0.113.5"), 600)], T0)
    table.handle_request(LAPTOP, ConnectorTransitIPRequest(
        [TransitIPRequest("169.254.128.9", "203.0.113.5", "GitHub")]), T0)
    doc = status_document(node)
    assert [a["name"] for a in doc["client"]["apps"]] == ["Served"]
    assert doc["connector"] == {
        "configured": True, "apps": ["GitHub"],
        "peers": [{"name": "laptop", "apps": ["GitHub"], "mappings": [
            {"transit": "169.254.128.9", "destination": "203.0.113.5", "app": "GitHub",
             "expires": T0 + 3600}]}],
    }
    text = render_table(doc)
    assert "connector for GitHub" in text and "169.254.128.9" in text and "in 1h00m" in text


def test_a_client_only_node_says_it_is_no_connector():
    doc = status_document(client_node())
    assert doc["connector"] == {"configured": False}
    assert doc["advertiseConnector"] is False and doc["node"] == "laptop"


def test_counters_of_the_datapath_and_the_control_plane_are_included():
    node = client_node()
    doc = status_document(node)
    assert doc["datapath"] == node.datapath.counters()
    assert doc["metrics"]["registration_acked"] == 0 and "reloads" in doc["metrics"]
    assert doc["now"] == T0


def test_the_document_encodes_as_json():
    node = client_node()
    node.reserve("github.com.", "2001:db8::1", flows=1)
    doc = status_document(node)
    assert msgspec.json.decode(msgspec.json.encode(doc)) == doc


def test_the_table_lists_addresses_in_document_order_with_time_left():
    node = client_node()
    quiet = node.reserve("github.com.", "203.0.113.9")
    busy = node.reserve("github.com.", "203.0.113.10", flows=4)
    node.assignments.attach(busy.transit, C1.name)
    node.t = T0 + 30
    expired = node.reserve("api.github.com.", "203.0.113.11")
    expired.expiry = T0  # expired, still in use until reclaimed
    text = render_table(status_document(node))
    lines = text.splitlines()
    assert lines[0] == "node laptop (client)"
    quiet_row, busy_row, expired_row = (
        next(i for i, line in enumerate(lines) if str(a.magic) in line)
        for a in (quiet, busy, expired))
    assert busy_row < quiet_row < expired_row
    assert "in 4m30s" in lines[quiet_row] and "(unregistered)" in lines[quiet_row]
    assert C1.name in lines[busy_row] and " 4 " in lines[busy_row]
    assert "expired 30s ago" in lines[expired_row]
    assert "app Alpha: connector gh-connector-1" in text and "no assignments" in text
    assert "pools" in text and "datapath" in text and "control plane" in text


def test_the_table_tolerates_a_sparse_document():
    """A document from another version (fields missing) still renders."""
    assert render_table({"configured": True}).startswith("node ? (client)")


def test_status_reflects_registrations_made_by_the_registrar():
    """End to end on the fakes: a registered assignment shows its connector."""
    node = client_node()
    a = node.reserve("github.com.", "203.0.113.1")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(node.registrar.run)
            assert await node.registrar.register([a])
            nursery.cancel_scope.cancel()

    run(main)
    [entry] = addresses(status_document(node), "GitHub", "github.com.")
    assert entry["connector"] == C1.name
    assert status_document(node)["metrics"]["registration_acked"] == 1
