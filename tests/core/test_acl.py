"""Selectors and the "who may use an app" rule."""

from __future__ import annotations

import json

import pytest

from conn25.core import acl
from conn25.core.config import Tailnet
from conn25.core.tailnet import load
from nodekeys import with_keys

TAILNET = json.dumps(with_keys({
  "tagOwners": {"tag:conn": ["group:admins"], "tag:web": ["group:admins"]},
  "groups": {"group:admins": ["alice@example.com"], "group:empty": []},
  "hosts": {"office": "100.64.1.0/24", "printer": "100.64.2.9"},
  "nodes": [
    {"name": "laptop", "user": "alice@example.com",
     "addresses": ["100.64.1.1", "fd7a:115c:a1e0::1"], "endpoint": "192.0.2.1"},
    {"name": "desktop", "user": "bob@example.com",
     "addresses": ["100.64.2.1"], "endpoint": "192.0.2.2"},
    {"name": "conn", "tags": ["tag:conn"], "addresses": ["100.64.3.1"],
     "endpoint": "192.0.2.3"},
    {"name": "web", "tags": ["tag:web", "tag:conn"], "addresses": ["fd7a:115c:a1e0::4"],
     "endpoint": "192.0.2.4"},
    {"name": "nobody", "addresses": ["100.64.2.9"], "endpoint": "192.0.2.5"},
  ],
}))
NAMES = ["laptop", "desktop", "conn", "web", "nobody"]


@pytest.fixture(scope="module")
def tn() -> Tailnet:
    return load(TAILNET)


def matching(t: Tailnet, selector: str) -> list[str]:
    return [n.name for n in t.nodes if acl.selector_matches(t, selector, n)]


@pytest.mark.parametrize(("selector", "names"), [
    ("*", NAMES),
    ("autogroup:member", ["laptop", "desktop", "nobody"]),
    ("autogroup:tagged", ["conn", "web"]),
    ("tag:conn", ["conn", "web"]),
    ("tag:web", ["web"]),
    ("group:admins", ["laptop"]),
    ("group:empty", []),
    ("group:undefined", []),
    ("alice@example.com", ["laptop"]),
    ("bob@example.com", ["desktop"]),
    ("carol@example.com", []),
    ("desktop", ["desktop"]),
    ("office", ["laptop"]),
    ("printer", ["nobody"]),
    ("100.64.3.1", ["conn"]),
    ("100.64.0.0/16", ["laptop", "desktop", "conn", "nobody"]),
    ("fd7a:115c:a1e0::/64", ["laptop", "web"]),
    ("fd7a:115c:a1e0::4", ["web"]),
    ("198.51.100.0/24", []),
    ("autogroup:internet", []),
    ("autogroup:self", []),
    ("nosuchname", []),
])
def test_selector_matches_exactly_the_nodes_it_names(tn, selector, names):
    assert matching(tn, selector) == names


@pytest.mark.parametrize(("selector", "kind"), [
    ("*", "all"), ("autogroup:member", "autogroup"), ("tag:x", "tag"), ("group:x", "group"),
    ("a@b", "user"), ("100.64.0.1", "ip"), ("fd7a::/16", "ip"), ("laptop", "name"),
    ("100.64.0.0/33", "name"),
])
def test_kind_classifies_selectors_without_the_tailnet(selector, kind):
    assert acl.kind(selector) == kind


@pytest.mark.parametrize(("dst", "split"), [
    ("autogroup:internet:*", ("autogroup:internet", "*")),
    ("tag:web:80,443", ("tag:web", "80,443")),
    ("100.64.0.1:22", ("100.64.0.1", "22")),
    ("[fd7a:115c:a1e0::1]:22", ("fd7a:115c:a1e0::1", "22")),
    ("fd7a:115c:a1e0::/48:*", ("fd7a:115c:a1e0::/48", "*")),
])
def test_split_dst_takes_the_ports_after_the_last_colon(dst, split):
    assert acl.split_dst(dst) == split


@pytest.mark.parametrize("dst", ["*", "laptop", "laptop:", ":22"])
def test_split_dst_without_ports_is_an_error(dst):
    with pytest.raises(ValueError, match="host:ports"):
        acl.split_dst(dst)


def policy(rules: str) -> Tailnet:
    """The test tailnet with these acls/grants sections."""
    return load(TAILNET.replace('"nodes":', rules + ',\n  "nodes":'))


def allowed(t: Tailnet) -> list[str]:
    return [n.name for n in t.nodes if acl.may_reach_internet(t, n)]


def test_acl_to_internet_all_ports_allows_its_sources():
    t = policy('"acls": [{"action": "accept", "src": ["autogroup:member"], '
               '"dst": ["autogroup:internet:*"]}]')
    assert allowed(t) == ["laptop", "desktop", "nobody"]


def test_acl_to_internet_on_some_ports_counts():
    t = policy('"acls": [{"action": "accept", "src": ["group:admins", "tag:web"], '
               '"dst": ["100.64.3.1:22", "autogroup:internet:443"]}]')
    assert allowed(t) == ["laptop", "web"]


def test_grant_to_internet_allows_its_sources():
    t = policy('"grants": [{"src": ["desktop", "100.64.3.1"], "dst": ["autogroup:internet"], '
               '"ip": ["*"]}]')
    assert allowed(t) == ["desktop", "conn"]


def test_rules_are_combined_over_acls_and_grants():
    t = policy('"acls": [{"action": "accept", "src": ["office"], "dst": ["autogroup:internet:*"]}],'
               '"grants": [{"src": ["bob@example.com"], "dst": ["autogroup:internet"]}]')
    assert allowed(t) == ["laptop", "desktop"]


@pytest.mark.parametrize("rules", [
    '"acls": []',
    '"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]',
    '"acls": [{"action": "accept", "src": ["*"], "dst": ["tag:conn:*", "100.64.0.0/10:*"]}]',
    '"acls": [{"action": "accept", "src": ["group:empty"], "dst": ["autogroup:internet:*"]}]',
    '"grants": [{"src": ["*"], "dst": ["tag:conn"]}]',
    '"grants": [{"src": ["carol@example.com"], "dst": ["autogroup:internet"]}]',
])
def test_rules_that_do_not_reach_the_internet_allow_nobody(rules):
    assert allowed(policy(rules)) == []


def test_member_rule_does_not_allow_tagged_nodes():
    t = policy('"acls": [{"action": "accept", "src": ["autogroup:member"], '
               '"dst": ["autogroup:internet:*"]}]')
    assert not acl.may_reach_internet(t, t.node("conn"))
    assert acl.may_reach_internet(t, t.node("laptop"))
