"""One node's view of a tailnet: policy.node_config and NodeConfig."""

from __future__ import annotations

import ipaddress
import json

import pytest

from conn25.core.config import APP_ATTRS, DEFAULT_POOLS, POOL_ATTR, Tailnet
from conn25.core.dnsname import DomainIndex
from conn25.core.iprange import IPRange, IPSet
from conn25.core.policy import node_config
from conn25.core.tailnet import load
from nodekeys import with_keys

TAGS = ["tag:a", "tag:b", "tag:c"]


def make(node_attrs: list[dict], nodes: list[dict] | None = None) -> Tailnet:
    doc = {
        "tagOwners": {t: ["alice@example.com"] for t in TAGS},
        "groups": {"group:eng": ["alice@example.com"]},
        "acls": [{"action": "accept", "src": ["group:eng"], "dst": ["autogroup:internet:*"]}],
        "nodeAttrs": node_attrs,
        "nodes": nodes if nodes is not None else NODES,
    }
    return load(json.dumps(with_keys(doc)))


NODES = [
    {"name": "client", "user": "alice@example.com",
     "addresses": ["100.64.0.1", "fd7a:115c:a1e0::1"], "endpoint": "192.0.2.1"},
    {"name": "other", "user": "bob@example.com", "addresses": ["100.64.0.2"],
     "endpoint": "192.0.2.2"},
    {"name": "conn-a", "tags": ["tag:a"], "addresses": ["100.64.0.3"], "endpoint": "192.0.2.3"},
    {"name": "conn-b2", "tags": ["tag:b"], "addresses": ["100.64.0.5"], "endpoint": "192.0.2.5"},
    {"name": "conn-b1", "tags": ["tag:b", "tag:c"], "addresses": ["100.64.0.4"],
     "endpoint": "192.0.2.4"},
]


def apps(*defs: tuple[str, list[str], str], target: str = "*") -> dict:
    return {"target": [target], "app": {APP_ATTRS[0]: [
        {"name": n, "domains": d, "connectors": [c]} for n, d, c in defs]}}


# Wide and Narrow overlap; Shared has the same wildcard as Narrow.
MATCHING = apps(
    ("Wide", ["*.example.com"], "tag:a"),
    ("Narrow", ["*.api.example.com", "exact.example.com"], "tag:b"),
    ("Shared", ["*.api.example.com"], "tag:c"),
)


def names(found: list) -> list[str]:
    return [a.name for a in found]


# -- own apps -----------------------------------------------------------------------


def test_own_apps_are_those_whose_tags_the_advertising_node_carries():
    """A node's own apps are those whose connector tags it carries."""
    t = make([MATCHING])
    assert names(node_config(t, "conn-a", advertise_connector=True).own_apps) == ["Wide"]
    assert names(node_config(t, "conn-b1", advertise_connector=True).own_apps) == [
        "Narrow", "Shared"]
    assert names(node_config(t, "client", advertise_connector=True).own_apps) == []


def test_a_node_that_does_not_advertise_serves_no_app():
    """The tag alone is not enough."""
    cfg = node_config(make([MATCHING]), "conn-a")
    assert cfg.own_apps == ()
    assert not any(cfg.serves(a) for a in cfg.apps)


def test_apps_follow_the_attribute_target():
    t = make([apps(("Eng", ["eng.example.com"], "tag:a"), target="group:eng"),
              apps(("All", ["all.example.com"], "tag:a"))])
    assert names(node_config(t, "client").apps) == ["Eng", "All"]
    assert names(node_config(t, "other").apps) == ["All"]
    assert node_config(t, "client").configured


def test_node_without_apps_is_not_configured():
    cfg = node_config(make([apps(("Eng", ["eng.example.com"], "tag:a"), target="group:eng")]),
                      "other")
    assert not cfg.configured and cfg.apps == ()
    assert cfg.mapping_app("eng.example.com") is None


def test_unknown_node_name_is_a_key_error():
    with pytest.raises(KeyError, match="nosuch"):
        node_config(make([MATCHING]), "nosuch")


def test_app_lookup_by_name():
    cfg = node_config(make([MATCHING]), "client")
    assert cfg.app("Narrow").connectors == ("tag:b",)
    assert cfg.app("narrow") is None


# -- pools and magic routes ------------------------------------------------------------


POOLS = {"target": ["*"], "app": {POOL_ATTR: [{
    "v4MagicIPPool": ["100.80.0.0-100.80.0.5", "100.80.1.0/24"],
    "v6MagicIPPool": ["fd7a:115c:a1e0:ab12::-fd7a:115c:a1e0:ab12::2"],
    "v4TransitIPPool": ["169.254.0.0/16"],
    "v6TransitIPPool": ["fd7a:115c:a1e0:ab13::/112"],
}]}}


def test_magic_routes_are_exactly_the_union_of_the_magic_pools():
    """No neighbouring addresses, no transit addresses."""
    routes = node_config(make([MATCHING, POOLS]), "client").pools.magic_routes()
    assert [str(r) for r in routes] == [
        "100.80.0.0/30", "100.80.0.4/31", "100.80.1.0/24",
        "fd7a:115c:a1e0:ab12::/127", "fd7a:115c:a1e0:ab12::2/128",
    ]
    assert sum(r.num_addresses for r in routes) == 6 + 256 + 3
    for outside in ["100.79.255.255", "100.80.0.6", "100.80.0.255", "100.80.2.0", "169.254.0.1",
                    "fd7a:115c:a1e0:ab12::3", "fd7a:115c:a1e0:ab11:ffff:ffff:ffff:ffff"]:
        addr = ipaddress.ip_address(outside)
        assert not any(addr in r for r in routes), outside


def test_pools_come_from_the_attribute():
    pools = node_config(make([MATCHING, POOLS]), "client").pools
    assert pools.v4_transit == IPSet.of([IPRange.parse("169.254.0.0/16")])
    assert pools.is_transit(ipaddress.ip_address("169.254.3.4"))
    assert not pools.is_transit(ipaddress.ip_address("100.80.0.1"))


def test_default_pools_apply_when_no_pool_attribute_targets_the_node():
    """The magic range routed into the TUN is the union of the magic pools, with the
    documented defaults."""
    t = make([MATCHING, dict(POOLS, target=["group:eng"])])
    assert node_config(t, "client").pools != DEFAULT_POOLS
    other = node_config(t, "other").pools
    assert other == DEFAULT_POOLS
    assert [str(r) for r in other.magic_routes()] == [
        "100.80.0.0/16", "fd7a:115c:a1e0:ab12::/112"]


# -- matching names to apps -----------------------------------------------------


@pytest.mark.parametrize(("qname", "expected"), [
    ("exact.example.com", ["Narrow"]),  # exact beats the *.example.com wildcard
    ("www.example.com", ["Wide"]),
    ("a.b.example.com", ["Wide"]),
    ("example.com", ["Wide"]),  # *.example.com matches example.com itself
    ("x.api.example.com", ["Narrow", "Shared"]),  # longest wildcard wins
    ("api.example.com", ["Narrow", "Shared"]),
    ("EXACT.Example.COM.", ["Narrow"]),
    ("notexample.com", []),
    ("example.org", []),
    ("", []),
    # Not a valid name, but its last labels are an app domain's: the app's, so it cannot
    # slip past the mapping.
    ("bad name.example.com", ["Wide"]),
    ("x@y.api.example.com", ["Narrow", "Shared"]),
    ("api.example.com\x00", []),
])
def test_name_matching(qname, expected):
    """Exact beats wildcard, longest wildcard wins; several apps in definition order;
    any case."""
    assert names(node_config(make([MATCHING]), "client").apps_for_name(qname)) == expected


def test_several_matching_apps_map_with_the_first():
    """Several apps may match; the first is used for the mapping."""
    assert node_config(make([MATCHING]), "client").mapping_app("x.api.example.com").name == "Narrow"


def test_connector_maps_nothing_for_the_apps_it_serves():
    """Exact and wildcard names of a served app are not mapped."""
    t = make([MATCHING])
    conn_b = node_config(t, "conn-b2", advertise_connector=True)
    assert conn_b.mapping_app("exact.example.com") is None
    assert conn_b.mapping_app("x.api.example.com") is None
    assert conn_b.mapping_app("www.example.com").name == "Wide"  # served by tag:a, not us


def test_serving_any_matching_app_suppresses_the_mapping():
    """Node conn-b1 serves Shared (tag:c), the second match, so it maps nothing either."""
    cfg = node_config(make([MATCHING]), "conn-b1", advertise_connector=True)
    assert cfg.mapping_app("x.api.example.com") is None


@pytest.mark.parametrize(("node", "advertise"), [
    ("conn-a", False),  # the tag alone
    ("client", True),  # advertising alone
])
def test_tag_alone_or_advertising_alone_does_not_suppress(node, advertise):
    """A node that advertises as a connector and carries the tag of a matching app maps nothing for
    that name (exact or wildcard). The tag alone, or advertising alone, does not suppress."""
    cfg = node_config(make([MATCHING]), node, advertise_connector=advertise)
    assert cfg.mapping_app("www.example.com").name == "Wide"
    assert cfg.mapping_app("example.com").name == "Wide"


# -- connectors and permissions ----------------------------------------------------------


def test_connector_candidates_are_tagged_peers_in_name_order():
    """Stable order by name; the node itself is never a candidate."""
    t = make([MATCHING])
    client = node_config(t, "client")
    assert [n.name for n in client.connector_candidates(client.app("Narrow"))] == [
        "conn-b1", "conn-b2"]
    assert [n.name for n in client.connector_candidates(client.app("Shared"))] == ["conn-b1"]
    conn_b1 = node_config(t, "conn-b1", advertise_connector=True)
    assert [n.name for n in conn_b1.connector_candidates(conn_b1.app("Narrow"))] == ["conn-b2"]


def test_may_use_apps_follows_the_policy():
    t = make([MATCHING])
    cfg = node_config(t, "conn-a", advertise_connector=True)
    assert cfg.may_use_apps(t.node("client"))  # group:eng may reach the internet
    assert not cfg.may_use_apps(t.node("other"))


def test_peer_by_address():
    cfg = node_config(make([MATCHING]), "client")
    assert cfg.peer_by_address(ipaddress.ip_address("100.64.0.4")).name == "conn-b1"
    assert cfg.peer_by_address(ipaddress.ip_address("100.64.9.9")) is None


# -- DomainIndex directly ------------------------------------------------------


def test_domain_index_exact_and_wildcard():
    idx = DomainIndex()
    assert not idx
    idx.add("*.example.com.", "W")
    idx.add("*.deep.example.com.", "D")
    idx.add("host.deep.example.com.", "E")
    assert idx
    assert idx.lookup("host.deep.example.com") == ["E"]
    assert idx.lookup("other.deep.example.com") == ["D"]
    assert idx.lookup("deep.example.com") == ["D"]
    assert idx.lookup("example.com") == ["W"]
    assert idx.lookup("com") == []
    assert idx.lookup("not a name") == []


def test_domain_index_keeps_apps_in_order_without_repeats():
    """One domain may belong to several apps; the order is kept."""
    idx = DomainIndex()
    for app in ["B", "A", "B"]:
        idx.add("github.com.", app)
    assert idx.lookup("GitHub.COM.") == ["B", "A"]
    result = idx.lookup("github.com")
    result.append("X")  # callers get a copy
    assert idx.lookup("github.com") == ["B", "A"]
