"""Loading and checking tailnet files."""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conn25.core import tailnet
from conn25.core.config import (
    APP_ATTRS,
    DEFAULT_KEEPALIVE,
    DEFAULT_POOLS,
    DEFAULT_PORT,
    POOL_ATTR,
    App,
)
from conn25.core.iprange import IPRange, IPSet
from conn25.core.policy import node_config
from conn25.core.tailnet import TailnetError, load, load_bytes, parse_endpoint
from nodekeys import public_key_text

EXAMPLE = Path(__file__).parents[2] / "examples" / "tailnet.hujson"
APPS = APP_ATTRS[0]
APP0 = f'nodeAttrs[0].app["{APPS}"][0]'
POOL0 = f'nodeAttrs[1].app["{POOL_ATTR}"][0]'

BASE: dict[str, Any] = {
    "tagOwners": {"tag:conn": ["group:admins"], "tag:other": ["alice@example.com"]},
    "groups": {"group:admins": ["alice@example.com"]},
    "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:internet:*"]}],
    "nodeAttrs": [
        {"target": ["*"], "app": {APPS: [
            {"name": "GitHub", "connectors": ["tag:conn"],
             "domains": ["github.com", "*.github.com"]},
        ]}},
        {"target": ["*"], "app": {POOL_ATTR: [{
            "v4MagicIPPool": ["100.80.0.0/16"],
            "v4TransitIPPool": ["169.254.0.0/16"],
            "v6MagicIPPool": ["fd7a:115c:a1e0:ab12::/112"],
            "v6TransitIPPool": ["fd7a:115c:a1e0:ab13::/112"],
        }]}},
    ],
    "nodes": [
        {"name": "laptop", "user": "alice@example.com",
         "addresses": ["100.64.0.1", "fd7a:115c:a1e0::1"], "endpoint": "192.0.2.1:41641",
         "publicKey": public_key_text("laptop")},
        {"name": "conn-1", "tags": ["tag:conn"], "addresses": ["100.64.0.2"],
         "endpoint": "192.0.2.2:41641", "egressIPs": ["203.0.113.1"],
         "publicKey": public_key_text("conn-1")},
    ],
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def errors_of(doc: Any, source: str = "t") -> list[str]:
    """The errors loading ``doc`` gives, without the source prefix."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(TailnetError) as info:
        load(text, source)
    prefix = f"{source}: "
    assert all(e.startswith(prefix) for e in info.value.errors)
    return [e[len(prefix):] for e in info.value.errors]


def add_pool_attr(doc: dict[str, Any], target: str, pools: dict[str, Any] | None = None) -> None:
    """Another pool attribute, for ``target``: ``pools``, or a copy of the base one's."""
    app = {POOL_ATTR: [pools]} if pools is not None else copy.deepcopy(doc["nodeAttrs"][1]["app"])
    doc["nodeAttrs"].append({"target": [target], "app": app})


def the_error(doc: Any) -> str:
    errors = errors_of(doc)
    assert len(errors) == 1, errors
    return errors[0]


# -- valid files --------------------------------------------------------------------


def test_example_file_loads():
    t = load_bytes(EXAMPLE.read_bytes(), str(EXAMPLE))
    assert [n.name for n in t.nodes] == ["laptop", "gh-connector-1", "gh-connector-2"]
    apps = [a for attr in t.node_attrs for a in attr.apps]
    assert apps == [App("GitHub", ("github.com.", "*.github.com."), ("tag:github-app-connector",))]
    assert t.nodes[2].endpoint == ("2001:db8::3", 41641)
    assert t.node_attrs[1].pools is not None
    assert len({n.public_key for n in t.nodes}) == 3
    assert all(len(n.public_key) == 32 for n in t.nodes)
    assert t.node_attrs[1].pools.v4_transit == IPSet.of([IPRange.parse("169.254.128.0/17")])


def test_example_addresses_come_from_documentation_ranges():
    """Only documentation and reserved addresses."""
    allowed = [ipaddress.ip_network(n) for n in (
        "192.0.2.0/24", "203.0.113.0/24", "198.51.100.0/24", "2001:db8::/32",
        "100.64.0.0/10", "fd7a:115c:a1e0::/48", "169.254.0.0/16")]
    t = load_bytes(EXAMPLE.read_bytes(), str(EXAMPLE))
    used = [ipaddress.ip_network(a) for n in t.nodes
            for a in (*n.addresses, *n.egress_ips, *(n.endpoint or ())[:1])]
    used += [p for attr in t.node_attrs if attr.pools
             for _, pool in attr.pools.named() for p in pool.prefixes()]
    assert len(used) > 10
    for net in used:
        assert any(net.version == a.version and net.subnet_of(a) for a in allowed), net


def test_base_document_is_valid():
    t = load(json.dumps(base()))
    assert t.node("conn-1").tags == ("tag:conn",)
    assert t.node("laptop").endpoint == ("192.0.2.1", 41641)
    assert t.acls[0].dst == ("autogroup:internet:*",)


def test_hujson_comments_and_trailing_commas():
    text = """
    // a line comment
    {
      /* a block
         comment */
      "tagOwners": {"tag:conn": ["alice@example.com",],},  // trailing commas
      "nodes": [
        {"name": "a", "addresses": ["100.64.0.1",], "endpoint": "192.0.2.1",
         "publicKey": "KEY",},
      ],
    }
    """
    t = load(text.replace("KEY", public_key_text("a")))
    assert t.node("a").endpoint == ("192.0.2.1", DEFAULT_PORT)
    assert t.tag_owners == {"tag:conn": ("alice@example.com",)}


def test_sections_of_the_policy_syntax_that_conn25d_does_not_use_are_ignored():
    doc = base()
    doc["autoApprovers"] = {"routes": {"0.0.0.0/0": ["tag:conn"]}}
    doc["ssh"] = [{"action": "accept", "src": ["*"], "dst": ["*"], "users": ["root"]}]
    doc["tests"] = []
    doc["nodeAttrs"].append({"target": ["*"], "attr": ["funnel"],
                             "app": {"example.com/cap/other": [{"anything": 1}]}})
    load(json.dumps(doc))


def test_missing_optional_sections_give_defaults():
    t = load(json.dumps({"nodes": [{"name": "a", "addresses": ["100.64.0.1"],
                                    "publicKey": public_key_text("a")}]}))
    assert t.node_attrs == () and t.acls == () and t.hosts == {}
    assert node_config(t, "a").pools == DEFAULT_POOLS


# -- syntax and shape -----------------------------------------------------------------


def test_syntax_error_gives_one_error_with_file_line_and_column():
    text = '{\n  "nodes": [\n    {"name": "a",, }\n  ]\n}\n'
    with pytest.raises(TailnetError) as info:
        load(text, "my.hujson")
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("my.hujson:3:19: syntax error: ")


def test_empty_file_is_a_syntax_error():
    with pytest.raises(TailnetError) as info:
        load("", "empty.hujson")
    assert info.value.errors[0].startswith("empty.hujson:1:1: syntax error")


def test_top_level_must_be_an_object():
    assert the_error("[1, 2]") == "(top level): expected an object, got a list"


def test_missing_nodes_section_is_an_error():
    assert the_error("{}").startswith("nodes: missing")


def test_unknown_section_is_an_error_with_a_suggestion():
    doc = base()
    doc["nodeAtrs"] = []
    assert the_error(doc) == 'nodeAtrs: unknown section (did you mean "nodeAttrs"?)'


def test_a_key_given_twice_is_an_error():
    text = json.dumps(base())[:-1] + ', "groups": {}}'
    errors = errors_of(text)
    assert "groups: given more than once" in errors


def test_unknown_key_in_a_node_is_an_error_with_a_suggestion():
    doc = base()
    doc["nodes"][0]["adresses"] = doc["nodes"][0]["addresses"]
    error = the_error(doc)
    assert error.startswith('nodes[0] ("laptop").adresses: unknown key (did you mean "addresses"?)')


@pytest.mark.parametrize(("section", "value", "message"), [
    ("nodes", {}, "nodes: expected a list, got an object"),
    ("acls", "x", "acls: expected a list, got a string"),
    ("groups", [], "groups: expected an object, got a list"),
    ("tagOwners", 1, "tagOwners: expected an object, got a number"),
    ("hosts", None, "hosts: expected an object, got null"),
    ("nodeAttrs", True, "nodeAttrs: expected a list, got a boolean"),
])
def test_a_section_of_the_wrong_type_is_an_error(section, value, message):
    doc = base()
    doc[section] = value
    assert message in errors_of(doc)


def test_error_string_is_every_error_one_per_line():
    err = TailnetError(["a: x", "b: y"])
    assert str(err) == "a: x\nb: y"
    assert err.errors == ["a: x", "b: y"]


# -- apps ----------------------------------------------------------------------


def test_wildcard_connector_is_rejected_with_the_upstream_message():
    """Exactly `connector ("*") must be a tag`, after the place."""
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0]["connectors"] = ["*"]
    assert the_error(doc) == f'{APP0}.connectors[0]: connector ("*") must be a tag'


@pytest.mark.parametrize("connector", ["group:admins", "alice@example.com", "laptop"])
def test_any_connector_that_is_not_a_tag_is_rejected(connector):
    """An app's connectors must be tags; `"*"` gives `connector ("*") must be a tag`."""
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0]["connectors"] = ["tag:conn", connector]
    expected = f"{APP0}.connectors[1]: connector ({json.dumps(connector)}) must be a tag"
    assert the_error(doc) == expected


def test_domains_are_normalised_and_deduplicated_within_an_app():
    """Domains are lower-cased, made fully qualified and de-duplicated within an app; `*.x` goes to
    the wildcard index, `x` to the exact index; one domain may belong to several apps."""
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0]["domains"] = [
        "GitHub.com", "github.com.", "*.GITHUB.com", "*.github.com", "api.github.com"]
    t = load(json.dumps(doc))
    assert t.node_attrs[0].apps[0].domains == ("github.com.", "*.github.com.", "api.github.com.")


def test_one_domain_may_belong_to_several_apps():
    """Domains are lower-cased, made fully qualified and de-duplicated within an app; `*.x` goes to
    the wildcard index, `x` to the exact index; one domain may belong to several apps."""
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS].append(
        {"name": "Other", "connectors": ["tag:other"], "domains": ["GITHUB.com"]})
    t = load(json.dumps(doc))
    assert [a.domains for a in t.node_attrs[0].apps] == [
        ("github.com.", "*.github.com."), ("github.com.",)]


def test_both_app_attribute_names_are_read():
    doc = base()
    doc["nodeAttrs"][0]["app"][APP_ATTRS[1]] = [
        {"name": "Exp", "connectors": ["tag:other"], "domains": ["example.com"]}]
    t = load(json.dumps(doc))
    assert [a.name for a in t.node_attrs[0].apps] == ["GitHub", "Exp"]


@pytest.mark.parametrize("domain", ["exa mple.com", "-bad.example.com", "a..b", "*", "a.*.com",
                                    ".", "x" * 64 + ".com", 7])
def test_a_domain_that_is_not_a_valid_name_is_an_error(domain):
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0]["domains"] = ["github.com", domain]
    assert the_error(doc).startswith(f"{APP0}.domains[1]: ")


@pytest.mark.parametrize(("app", "message"), [
    ({"connectors": ["tag:conn"], "domains": ["a.com"]}, f'{APP0}: missing "name"'),
    ({"name": "A", "domains": ["a.com"]}, f'{APP0}: missing "connectors"'),
    ({"name": "A", "connectors": ["tag:conn"]}, f'{APP0}: missing "domains"'),
    ({"name": 5, "connectors": ["tag:conn"], "domains": ["a.com"]},
     f"{APP0}.name: expected a string, got a number"),
    ({"name": "", "connectors": ["tag:conn"], "domains": ["a.com"]},
     f"{APP0}.name: must not be empty"),
    ({"name": "A", "connectors": "tag:conn", "domains": ["a.com"]},
     f"{APP0}.connectors: expected a list, got a string"),
    ({"name": "A", "connectors": [], "domains": ["a.com"]},
     f"{APP0}.connectors: must not be empty"),
    ({"name": "A", "connectors": ["tag:conn"], "domains": []},
     f"{APP0}.domains: must not be empty"),
    ({"name": "A", "connectors": ["tag:conn"], "domains": [None]},
     f"{APP0}.domains[0]: expected a string, got null"),
    ("GitHub", f"{APP0}: expected an object, got a string"),
])
def test_bad_app_json_is_an_error(app, message):
    """Bad app or pool JSON, or two pool attributes for one node, is an error and leaves the node
    unconfigured (the previous configuration stays in a running daemon)."""
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0] = app
    assert the_error(doc) == message


def test_unknown_key_in_an_app_is_an_error_but_upstream_routes_are_ignored():
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0]["routes"] = ["198.51.100.0/24"]
    load(json.dumps(doc))
    doc["nodeAttrs"][0]["app"][APPS][0]["domain"] = ["x.com"]
    assert the_error(doc).startswith(f'{APP0}.domain: unknown key (did you mean "domains"?)')


def test_app_list_of_the_wrong_type_is_an_error():
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS] = {"name": "GitHub"}
    assert the_error(doc) == f'nodeAttrs[0].app["{APPS}"]: expected a list, got an object'


def test_a_misspelt_app_connector_attribute_is_an_error():
    doc = base()
    doc["nodeAttrs"][0]["app"]["tailscale.com/app-connector"] = []
    assert the_error(doc).startswith(
        'nodeAttrs[0].app["tailscale.com/app-connector"]: unknown app connector attribute')


def test_same_app_name_with_a_different_definition_is_an_error():
    doc = base()
    doc["nodeAttrs"].append({"target": ["laptop"], "app": {APPS: [
        {"name": "GitHub", "connectors": ["tag:conn"], "domains": ["gitlab.com"]}]}})
    assert the_error(doc) == (f'nodeAttrs[2].app["{APPS}"][0].name: app "GitHub" is already '
                              f"defined differently at {APP0}")


def test_same_app_name_with_an_equal_definition_is_one_app():
    doc = base()
    doc["nodeAttrs"].append({"target": ["laptop"], "app": {APP_ATTRS[1]: [
        {"name": "GitHub", "connectors": ["tag:conn"],
         "domains": ["*.github.com", "GITHUB.COM"]}]}})
    t = load(json.dumps(doc))
    assert t.node_attrs[2].apps[0] is t.node_attrs[0].apps[0]
    assert len(node_config(t, "laptop").apps) == 1


# -- tags ------------------------------------------------------------------------


def test_connector_tag_without_tag_owner_is_an_error():
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0]["connectors"] = ["tag:nobody"]
    assert the_error(doc) == f'{APP0}.connectors[0]: tag "tag:nobody" has no tagOwners entry'


def test_node_tag_without_tag_owner_is_an_error():
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    doc["nodes"][1]["tags"] = ["tag:conn", "tag:nobody"]
    assert the_error(doc) == 'nodes[1] ("conn-1").tags[1]: tag "tag:nobody" has no tagOwners entry'


@pytest.mark.parametrize(("where", "place"), [
    (lambda d: d["acls"][0]["src"], "acls[0].src[1]"),
    (lambda d: d["nodeAttrs"][1]["target"], "nodeAttrs[1].target[1]"),
    (lambda d: d["tagOwners"]["tag:other"], 'tagOwners["tag:other"][1]'),
])
def test_selector_tag_without_tag_owner_is_an_error(where, place):
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    where(doc).append("tag:nobody")
    assert the_error(doc) == f'{place}: tag "tag:nobody" has no tagOwners entry'


def test_acl_destination_tag_without_tag_owner_is_an_error():
    doc = base()
    doc["acls"][0]["dst"].append("tag:nobody:22")
    assert the_error(doc) == 'acls[0].dst[1]: tag "tag:nobody" has no tagOwners entry'


def test_malformed_tag_names_are_errors():
    doc = base()
    doc["tagOwners"]["tag:"] = []
    doc["nodes"][1]["tags"] = ["tag:conn", "tag:a b"]
    assert errors_of(doc) == [
        'tagOwners["tag:"]: "tag:" is not a valid tag (tag:name)',
        'nodes[1] ("conn-1").tags[1]: "tag:a b" is not a valid tag (tag:name)',
    ]


def test_tagged_node_with_a_user_is_an_error():
    """Decision: a tagged node has no user identity (upstream: connectors are tag-owned)."""
    doc = base()
    doc["nodes"][1]["user"] = "alice@example.com"
    assert the_error(doc).startswith('nodes[1] ("conn-1"): has both a user and tags')


def test_node_with_neither_user_nor_tags_is_allowed():
    doc = base()
    del doc["nodes"][0]["user"]
    assert load(json.dumps(doc)).node("laptop").user is None


# -- groups, hosts, acls, grants --------------------------------------------------------


def test_undefined_group_is_an_error():
    doc = base()
    doc["acls"][0]["src"] = ["group:nobody"]
    assert the_error(doc) == 'acls[0].src[0]: group "group:nobody" is not defined in groups'


def test_groups_hold_users_only():
    doc = base()
    doc["groups"]["group:admins"] = ["alice@example.com", "group:x", "bob"]
    doc["groups"]["admins"] = []
    assert errors_of(doc) == [
        'groups["group:admins"][1]: "group:x" is not a user (name@domain); groups list users only',
        'groups["group:admins"][2]: "bob" is not a user (name@domain); groups list users only',
        'groups.admins: "admins" is not a group name (group:name)',
    ]


def test_hosts_must_be_addresses_or_prefixes():
    doc = base()
    doc["hosts"] = {"good": "100.64.0.0/24", "one": "100.64.0.1", "bad": "100.64.0.0/33",
                    "tag:x": "100.64.0.1", "num": 5}
    assert errors_of(doc) == [
        'hosts.bad: "100.64.0.0/33" is not an IP address or CIDR',
        'hosts["tag:x"]: "tag:x" cannot be a host name (it reads as a tag selector)',
        "hosts.num: expected a string, got a number",
    ]


def test_unknown_selector_is_an_error():
    doc = base()
    doc["acls"][0]["src"] = ["laptop", "nosuchnode", "100.64.0.0/10", "bob@example.com", "*"]
    assert the_error(doc) == ('acls[0].src[1]: "nosuchnode" is not a node name, host, tag, group, '
                              "user, IP address or CIDR")


def test_autogroup_internet_is_only_a_destination():
    doc = base()
    doc["acls"][0]["src"] = ["autogroup:internet"]
    doc["nodeAttrs"][0]["target"] = ["autogroup:admin"]
    errors = errors_of(doc)
    assert [e.split(":")[0] for e in errors] == ["acls[0].src[0]", "nodeAttrs[0].target[0]"]
    assert all("is not allowed here" in e for e in errors)


@pytest.mark.parametrize(("dst", "message"), [
    ("autogroup:internet", '"autogroup:internet" has no ports; write "autogroup:internet:*"'),
    ("tag:conn", '"tag:conn" has no ports; write "tag:conn:*"'),
    ("autogroup:internet:http", '"http" are not ports ("*", "22", "80,443" or "1000-2000")'),
    ("100.64.0.2:80,90-70", '"80,90-70" are not ports ("*", "22", "80,443" or "1000-2000")'),
    ("100.64.0.2:65536", '"65536" are not ports ("*", "22", "80,443" or "1000-2000")'),
    ("*", 'destination \'*\' is not "host:ports"'),
])
def test_bad_acl_destinations_are_errors(dst, message):
    doc = base()
    doc["acls"][0]["dst"] = [dst]
    assert the_error(doc) == f"acls[0].dst[0]: {message}"


@pytest.mark.parametrize("dst", ["*:*", "autogroup:internet:80,443", "100.64.0.2:22",
                                 "[fd7a:115c:a1e0::1]:22", "fd7a:115c:a1e0::/48:1000-2000",
                                 "tag:conn:*", "group:admins:*", "laptop:*", "autogroup:self:*"])
def test_good_acl_destinations_load(dst):
    doc = base()
    doc["acls"][0]["dst"] = [dst]
    assert load(json.dumps(doc)).acls[0].dst == (dst,)


def test_acls_accept_only():
    doc = base()
    doc["acls"][0]["action"] = "drop"
    del doc["acls"][0]["src"]
    assert errors_of(doc) == [
        'acls[0]: missing "src"',
        'acls[0].action: "drop" is not supported; policy rules only "accept"',
    ]


def test_grants_load_with_their_extra_fields_ignored():
    doc = base()
    doc["grants"] = [{"src": ["group:admins"], "dst": ["autogroup:internet"], "ip": ["*"]}]
    t = load(json.dumps(doc))
    assert t.grants[0].src == ("group:admins",) and t.grants[0].dst == ("autogroup:internet",)
    doc["grants"][0]["dst"] = []
    assert the_error(doc) == "grants[0].dst: must not be empty"


# -- nodes -------------------------------------------------------------------------


def test_duplicate_node_name_is_an_error():
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    doc["nodes"].append({"name": "laptop", "addresses": ["100.64.0.9"], "endpoint": "192.0.2.9",
                         "publicKey": public_key_text("laptop-2")})
    assert the_error(doc) == ('nodes[2] ("laptop").name: duplicate node name "laptop" '
                              '(also nodes[0] ("laptop").name)')


def test_duplicate_address_across_nodes_is_an_error():
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    doc["nodes"][1]["addresses"] = ["100.64.0.2", "fd7a:115c:a1e0::1"]
    assert the_error(doc) == ('nodes[1] ("conn-1").addresses[1]: duplicate address '
                              'fd7a:115c:a1e0::1 (also nodes[0] ("laptop").addresses[1])')


def test_one_address_per_family():
    doc = base()
    doc["nodes"][1]["addresses"] = ["100.64.0.2", "100.64.0.3"]
    assert the_error(doc).startswith('nodes[1] ("conn-1").addresses[1]: second IPv4 address')


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "-x", '"-x" is not a valid node name'),
    ("name", "a.b", '"a.b" is not a valid node name'),
    ("addresses", [], "must not be empty"),
    ("addresses", ["100.64.0.300"], "'100.64.0.300' is not an IP address"),
    ("user", "alice", '"alice" is not a user (name@domain)'),
    ("egressIPs", ["203.0.113.x"], "'203.0.113.x' is not an IP address"),
])
def test_bad_node_fields_are_errors(field, value, message):
    doc = base()
    doc["nodes"][0][field] = value
    error = the_error(doc)
    assert error.startswith("nodes[0]") and message in error


def test_null_node_fields_are_errors():
    doc = base()
    doc["nodes"][0].update(name=None, addresses=None, endpoint=None, user=None)
    assert errors_of(doc) == [
        "nodes[0].name: expected a string, got null",
        "nodes[0].user: expected a string, got null",
        "nodes[0].addresses: expected a list, got null",
        "nodes[0].endpoint: expected a string, got null",
    ]


def test_missing_node_fields_are_errors():
    doc = base()
    doc["nodes"][0] = {"user": "alice@example.com"}
    assert errors_of(doc) == ['nodes[0]: missing "name"', 'nodes[0]: missing "addresses"',
                              f'nodes[0]: missing "publicKey" ({PUBLIC_KEY_HINT})']


# -- nodes[].publicKey ----------------------------------------------------------------

# RFC 7748 section 6.1: Alice's and Bob's X25519 public keys, in WireGuard's base64.
KEY_A = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
KEY_B = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
TEXT_A = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
TEXT_B = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="


def test_public_keys_are_read_as_32_bytes():
    assert base64.b64decode(TEXT_A) == KEY_A and base64.b64decode(TEXT_B) == KEY_B
    doc = base()
    doc["nodes"][0]["publicKey"] = TEXT_A
    doc["nodes"][1]["publicKey"] = TEXT_B
    t = load(json.dumps(doc))
    assert [n.public_key for n in t.nodes] == [KEY_A, KEY_B]


PUBLIC_KEY_HINT = ('the node\'s WireGuard public key; on the node, "conn25d up" creates its '
                   'key and prints the value to put here')


def test_a_node_without_a_public_key_is_an_error_naming_the_node():
    """Every node must have a key: the overlay authenticates peers by it."""
    doc = base()
    del doc["nodes"][1]["publicKey"]
    assert the_error(doc) == f'nodes[1] ("conn-1"): missing "publicKey" ({PUBLIC_KEY_HINT})'


@pytest.mark.parametrize(("value", "message"), [
    (TEXT_A[:-1], "not a WireGuard key: 43 characters, a key is 44 characters of base64"),
    (TEXT_A + "A", "not a WireGuard key: 45 characters"),
    (TEXT_A[:-2] + "==", 'ends in exactly one "="'),  # 31 bytes
    (TEXT_A[:-2] + "_=", "not base64"),  # the URL-safe alphabet is not WireGuard's
    (TEXT_A[:-2] + "n=", "not the canonical base64 of a key"),  # sets bits past the 256th
    (KEY_A.hex(), "64 characters"),
    ("", "0 characters"),
])
def test_a_malformed_public_key_is_an_error_that_does_not_quote_it(value, message):
    doc = base()
    doc["nodes"][1]["publicKey"] = value
    error = the_error(doc)
    assert error.startswith('nodes[1] ("conn-1").publicKey: ')
    assert message in error
    assert TEXT_A[:8] not in error and KEY_A.hex()[:8] not in error


def test_a_public_key_that_is_not_a_string_is_an_error():
    doc = base()
    doc["nodes"][0]["publicKey"] = list(KEY_A)
    assert the_error(doc) == 'nodes[0] ("laptop").publicKey: expected a string, got a list'


def test_duplicate_public_keys_are_errors_each_naming_the_first():
    doc = base()
    doc["nodes"].append({"name": "other", "user": "alice@example.com",
                         "addresses": ["100.64.0.9"]})
    for node in doc["nodes"]:
        node["publicKey"] = TEXT_A
    assert errors_of(doc) == [
        f'nodes[{i}] ("{name}").publicKey: the same public key as nodes[0] ("laptop").publicKey;'
        " every node needs a key pair of its own"
        for i, name in ((1, "conn-1"), (2, "other"))
    ]


def test_public_key_errors_come_with_the_files_other_errors():
    doc = base()
    doc["nodes"][0]["publicKey"] = "nope"
    doc["nodes"][1]["publicKey"] = TEXT_B
    doc["nodes"][1]["addresses"] = ["100.64.0.1"]
    errors = errors_of(doc)
    assert len(errors) == 2
    assert errors[0].startswith('nodes[0] ("laptop").publicKey: not a WireGuard key')
    assert errors[1].startswith('nodes[1] ("conn-1").addresses[0]: duplicate address')


@pytest.mark.parametrize(("text", "endpoint"), [
    ("192.0.2.1:41641", ("192.0.2.1", 41641)),
    ("192.0.2.1:1", ("192.0.2.1", 1)),
    ("192.0.2.1", ("192.0.2.1", DEFAULT_PORT)),
    ("[2001:db8::1]:5000", ("2001:db8::1", 5000)),
    ("[2001:DB8:0::1]", ("2001:db8::1", DEFAULT_PORT)),
    ("2001:db8::1", ("2001:db8::1", DEFAULT_PORT)),
])
def test_endpoints_parse_with_the_default_port(text, endpoint):
    assert parse_endpoint(text) == endpoint


@pytest.mark.parametrize("text", ["192.0.2.1:0", "192.0.2.1:65536", "192.0.2.1:", "192.0.2.1:x",
                                  "host.example:41641", "[2001:db8::1", "[2001:db8::1]5000",
                                  "[192.0.2.1:80", "", "[]:1", "192.0.2:80"])
def test_bad_endpoints_are_errors(text):
    with pytest.raises(ValueError, match=r"ip:port|port|empty"):
        parse_endpoint(text)
    doc = base()
    doc["nodes"][0]["endpoint"] = text
    assert the_error(doc).startswith('nodes[0] ("laptop").endpoint: ')


def test_duplicate_endpoint_is_an_error():
    doc = base()
    doc["nodes"][1]["endpoint"] = "192.0.2.1"
    assert the_error(doc) == ('nodes[1] ("conn-1").endpoint: duplicate endpoint "192.0.2.1" '
                              '(also nodes[0] ("laptop").endpoint)')


def test_the_endpoint_is_optional_and_nodes_without_one_are_not_duplicates():
    """A node behind a NAT has no endpoint of its own; two such nodes do not clash."""
    doc = base()
    del doc["nodes"][0]["endpoint"]
    doc["nodes"].append({"name": "phone", "user": "alice@example.com",
                         "addresses": ["100.64.0.9"], "publicKey": public_key_text("phone")})
    t = load(json.dumps(doc))
    assert [n.endpoint for n in t.nodes] == [None, ("192.0.2.2", 41641), None]


# -- nodes[].persistentKeepalive ---------------------------------------------------------


def test_keepalive_defaults_to_25_s_without_an_endpoint_and_off_with_one():
    doc = base()
    del doc["nodes"][0]["endpoint"]
    t = load(json.dumps(doc))
    assert DEFAULT_KEEPALIVE == 25
    assert [n.persistent_keepalive for n in t.nodes] == [25, 0]


def test_a_given_keepalive_overrides_either_default():
    doc = base()
    del doc["nodes"][0]["endpoint"]
    doc["nodes"][0]["persistentKeepalive"] = 0
    doc["nodes"][1]["persistentKeepalive"] = 65535
    t = load(json.dumps(doc))
    assert [n.persistent_keepalive for n in t.nodes] == [0, 65535]


@pytest.mark.parametrize(("value", "message"), [
    (-1, "-1 is out of range: 0 to 65535 seconds (0 = off)"),
    (65536, "65536 is out of range: 0 to 65535 seconds (0 = off)"),
    (2.5, "expected whole seconds (0 to 65535, 0 = off), got 2.5"),
    ("25", "expected whole seconds (0 to 65535, 0 = off), got a string"),
    (True, "expected whole seconds (0 to 65535, 0 = off), got a boolean"),
    (None, "expected whole seconds (0 to 65535, 0 = off), got null"),
])
def test_a_bad_keepalive_is_an_error_with_its_place(value, message):
    doc = base()
    doc["nodes"][1]["persistentKeepalive"] = value
    assert the_error(doc) == f'nodes[1] ("conn-1").persistentKeepalive: {message}'


# -- pools -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), [
    ("100.80.0.9-100.80.0.1", "ends before it starts"),
    ("100.80.0.0-fd7a:115c:a1e0:ab12::", "mixes IPv4 and IPv6"),
    ("100.80.0.1/16", "not a valid prefix"),
    ("100.80.0.0/33", "not a valid prefix"),
    ("100.80.0", "not an IP address"),
    ("fd7a:115c:a1e0:ab14::/112", "is IPv6; v4MagicIPPool takes IPv4 ranges"),
])
def test_malformed_range_is_an_error(text, reason):
    """Bad app or pool JSON, or two pool attributes for one node, is an error and leaves the node
    unconfigured (the previous configuration stays in a running daemon)."""
    doc = base()
    doc["nodeAttrs"][1]["app"][POOL_ATTR][0]["v4MagicIPPool"].append(text)
    error = the_error(doc)
    assert error.startswith(f"{POOL0}.v4MagicIPPool[1]: ") and reason in error


@pytest.mark.parametrize(("pools", "message"), [
    ([], "expected a list with one pools object, got 0 items"),
    ([{}, {}], "expected a list with one pools object, got 2 items"),
    ({"v4MagicIPPool": []}, "expected a list, got an object"),
])
def test_pool_attribute_must_be_a_list_with_one_object(pools, message):
    """Bad app or pool JSON, or two pool attributes for one node, is an error and leaves the node
    unconfigured (the previous configuration stays in a running daemon)."""
    doc = base()
    doc["nodeAttrs"][1]["app"][POOL_ATTR] = pools
    assert the_error(doc) == f'nodeAttrs[1].app["{POOL_ATTR}"]: {message}'


def test_bad_pool_json_is_an_error():
    """Bad app or pool JSON, or two pool attributes for one node, is an error and leaves the node
    unconfigured (the previous configuration stays in a running daemon)."""
    doc = base()
    pools = doc["nodeAttrs"][1]["app"][POOL_ATTR][0]
    pools["v4MagicIPPool"] = "100.80.0.0/16"
    pools["v4TransitIPPool"] = [5]
    pools["v5MagicIPPool"] = []
    errors = errors_of(doc)
    assert errors[0].startswith(f"{POOL0}.v5MagicIPPool: unknown key (did you mean ")
    assert errors[0].endswith('expected one of "v4MagicIPPool", "v6MagicIPPool", '
                              '"v4TransitIPPool", "v6TransitIPPool"')
    assert errors[1:] == [
        f"{POOL0}.v4MagicIPPool: expected a list, got a string",
        f"{POOL0}.v4TransitIPPool[0]: expected a string, got a number",
    ]


def test_magic_and_transit_pools_come_in_pairs():
    doc = base()
    del doc["nodeAttrs"][1]["app"][POOL_ATTR][0]["v6TransitIPPool"]
    assert the_error(doc) == f"{POOL0}: v6MagicIPPool and v6TransitIPPool must be given together"
    doc["nodeAttrs"][1]["app"][POOL_ATTR][0] = {}
    assert the_error(doc) == f"{POOL0}: no pools given"


def test_ipv4_only_pools_are_allowed():
    doc = base()
    pools = doc["nodeAttrs"][1]["app"][POOL_ATTR][0]
    del pools["v6MagicIPPool"], pools["v6TransitIPPool"]
    p = node_config(load(json.dumps(doc)), "laptop").pools
    assert p.v4_magic and not p.v6_magic and not p.v6_transit


def test_overlapping_magic_and_transit_pools_are_an_error():
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    doc["nodeAttrs"][1]["app"][POOL_ATTR][0]["v4TransitIPPool"] = ["100.80.255.0-100.81.0.5"]
    assert the_error(doc) == (
        f"{POOL0}.v4MagicIPPool[0]: v4MagicIPPool 100.80.0.0-100.80.255.255 overlaps "
        f"v4TransitIPPool 100.80.255.0-100.81.0.5 at {POOL0}.v4TransitIPPool[0]")


def test_pools_of_different_attributes_must_not_overlap_magic_with_transit():
    """Transit IPs travel between nodes, so one node's magic pool must not hold another's."""
    doc = base()
    doc["nodeAttrs"][1]["target"] = ["laptop"]
    add_pool_attr(doc, "conn-1", {"v4MagicIPPool": ["169.254.1.0/24"],
                                  "v4TransitIPPool": ["169.254.2.0/24"]})
    assert the_error(doc) == (
        f"{POOL0}.v4TransitIPPool[0]: v4TransitIPPool 169.254.0.0-169.254.255.255 overlaps "
        f'v4MagicIPPool 169.254.1.0-169.254.1.255 at nodeAttrs[2].app["{POOL_ATTR}"]'
        "[0].v4MagicIPPool[0]")


def test_magic_pools_of_different_nodes_may_be_the_same():
    """Magic IPs are per client, so two clients may use the same range."""
    doc = base()
    doc["nodeAttrs"][1]["target"] = ["laptop"]
    add_pool_attr(doc, "conn-1")
    t = load(json.dumps(doc))
    assert node_config(t, "laptop").pools == node_config(t, "conn-1").pools


def test_pool_holding_a_node_address_is_an_error():
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    doc["nodeAttrs"][1]["app"][POOL_ATTR][0]["v6MagicIPPool"] = ["fd7a:115c:a1e0::/120"]
    assert the_error(doc) == (
        'nodes[0] ("laptop").addresses[1]: fd7a:115c:a1e0::1 lies in v6MagicIPPool '
        f"fd7a:115c:a1e0::-fd7a:115c:a1e0::ff at {POOL0}.v6MagicIPPool[0]")


def test_default_pools_count_when_a_node_has_no_pool_attribute():
    """A node address in the default magic pool is an error once the defaults apply."""
    doc = base()
    doc["nodes"].append({"name": "odd", "addresses": ["100.80.0.7"],
                         "publicKey": public_key_text("odd")})
    # The pool attribute covers every node: the defaults are not used, but the
    # address is still in that attribute's (equal) magic pool.
    assert "lies in v4MagicIPPool" in the_error(doc)
    del doc["nodeAttrs"][1]
    error = the_error(doc)
    assert error.startswith('nodes[2] ("odd").addresses[0]: 100.80.0.7 lies in v4MagicIPPool '
                            "100.80.0.0-100.80.255.255 at the default pools")


def test_default_pools_must_not_overlap_a_pool_attribute():
    doc = base()
    doc["nodeAttrs"][1]["target"] = ["laptop"]  # conn-1 gets the defaults
    doc["nodeAttrs"][1]["app"][POOL_ATTR][0]["v4TransitIPPool"] = ["100.80.7.0/24"]
    doc["nodeAttrs"][1]["app"][POOL_ATTR][0]["v4MagicIPPool"] = ["100.90.0.0/24"]
    assert the_error(doc) == (
        f"{POOL0}.v4TransitIPPool[0]: v4TransitIPPool 100.80.7.0-100.80.7.255 overlaps "
        "v4MagicIPPool 100.80.0.0-100.80.255.255 at the default pools, used by \"conn-1\" "
        f"(no {POOL_ATTR} applies)")


def test_two_pool_attributes_for_one_node_is_an_error():
    """The error names the node and both places."""
    doc = base()
    add_pool_attr(doc, "tag:conn")
    assert the_error(doc) == (
        f'nodes[1] ("conn-1"): 2 pool attributes apply to this node: '
        f'nodeAttrs[1].app["{POOL_ATTR}"] and nodeAttrs[2].app["{POOL_ATTR}"]')


def test_pool_attributes_for_disjoint_targets_are_fine():
    doc = base()
    doc["nodeAttrs"][1]["target"] = ["autogroup:member"]
    add_pool_attr(doc, "tag:conn", {"v4MagicIPPool": ["100.81.0.0/24"],
                                    "v4TransitIPPool": ["169.254.0.0/16"]})
    t = load(json.dumps(doc))
    assert node_config(t, "conn-1").pools.v4_magic == IPSet.of([IPRange.parse("100.81.0.0/24")])
    assert node_config(t, "laptop").pools.v4_magic == IPSet.of([IPRange.parse("100.80.0.0/16")])


# -- everything at once ----------------------------------------------------------------


def test_all_errors_are_reported_at_once_each_with_its_place():
    """Pools must not overlap each other or any node address; a tag must have a `tagOwners` entry;
    node names and addresses are unique. All errors are reported at once, each with its place."""
    doc = base()
    doc["nodeAttrs"][0]["app"][APPS][0]["connectors"] = ["*", "tag:ghost"]
    doc["nodeAttrs"][0]["app"][APPS][0]["domains"] = ["ok.com", "bad..com"]
    doc["nodeAttrs"][1]["app"][POOL_ATTR][0]["v4TransitIPPool"] = ["100.80.0.0/24", "1-2"]
    doc["nodes"][1]["addresses"] = ["100.64.0.1"]
    doc["nodes"].append({"name": "laptop", "addresses": ["100.64.0.5"], "endpoint": "192.0.2.5",
                         "publicKey": public_key_text("laptop-2")})
    errors = errors_of(doc)
    places = [e.split(": ")[0] for e in errors]
    assert places == [
        'nodes[1] ("conn-1").addresses[0]',
        'nodes[2] ("laptop").name',
        f"{APP0}.connectors[0]",
        f"{APP0}.connectors[1]",
        f"{APP0}.domains[1]",
        f"{POOL0}.v4TransitIPPool[1]",
        f"{POOL0}.v4MagicIPPool[0]",
    ], errors


def test_load_bytes_names_the_source_in_every_error():
    doc = base()
    doc["nodes"][0]["endpoint"] = "nowhere"
    with pytest.raises(TailnetError) as info:
        load_bytes(json.dumps(doc).encode(), "t.hujson")
    assert info.value.errors == ['t.hujson: nodes[0] ("laptop").endpoint: "nowhere" is not '
                                 '"ip:port" or "[ipv6]:port" ("nowhere" is not an IP address)']


def test_load_bytes_rejects_text_that_is_not_utf8():
    with pytest.raises(TailnetError, match=r"t\.hujson: not UTF-8"):
        load_bytes(b'{"nodes": ["\xff"]}', "t.hujson")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)


@settings(max_examples=75, deadline=None)
@given(field=st.sampled_from(["name", "user", "tags", "addresses", "endpoint", "egressIPs",
                              "publicKey", "persistentKeepalive"]),
       value=json_values, where=st.sampled_from(["node", "app", "pools", "acl", "top"]))
def test_any_json_gives_a_tailnet_or_a_tailnet_error(field, value, where):
    """Whatever the shape of a value, load never fails with anything but TailnetError."""
    doc = base()
    target = {"node": doc["nodes"][0], "app": doc["nodeAttrs"][0]["app"][APPS][0],
              "pools": doc["nodeAttrs"][1]["app"][POOL_ATTR][0], "acl": doc["acls"][0],
              "top": doc}[where]
    target[field if where == "node" else next(iter(target))] = value
    try:
        tailnet.load(json.dumps(doc))
    except TailnetError as e:
        assert e.errors
