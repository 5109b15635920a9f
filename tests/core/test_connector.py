"""The connector's transit-IP tables."""

import ipaddress

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conn25.core import config, peerapi
from conn25.core.config import App, Member, NodeConfig, Tailnet
from conn25.core.connector import (
    MAPPING_LIFETIME,
    ConnectorTable,
    Mapping,
    MappingStore,
    PackedStore,
    Resolutions,
    saved_row,
)
from conn25.core.peerapi import Code, ConnectorTransitIPRequest, NotConfigured, TransitIPRequest
from nodekeys import public_key


def ip(text: str):
    return ipaddress.ip_address(text)


TAG = "tag:github-app-connector"
GITHUB = App("GitHub", ("github.com.", "*.github.com."), (TAG,))
OTHER = App("Other", ("example.com.",), ("tag:other",))
GITLAB = App("GitLab", ("gitlab.com.",), (TAG,))

LAPTOP = Member("laptop", (ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")), ("192.0.2.1", 41641),
                public_key("laptop"), user="alice@example.com")
PHONE = Member("phone", (ip("100.64.0.3"),), ("192.0.2.3", 41641),
               public_key("phone"), user="bob@example.com")
V6ONLY = Member("v6only", (ip("fd7a:115c:a1e0::5"),), ("192.0.2.5", 41641),
                public_key("v6only"), user="bob@example.com")
INTRUDER = Member("intruder", (ip("100.64.0.4"), ip("fd7a:115c:a1e0::4")), ("192.0.2.4", 41641),
                  public_key("intruder"), user="eve@example.com")
CONNECTOR = Member("gh-connector-1", (ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")),
                 ("192.0.2.2", 41641), public_key("gh-connector-1"), tags=(TAG,))
TAILNET = Tailnet(nodes=(LAPTOP, PHONE, V6ONLY, INTRUDER, CONNECTOR),
                  tag_owners={TAG: ("alice@example.com",)})

T4 = [ip(f"169.254.128.{i}") for i in range(1, 20)]
T6 = [ip(f"fd7a:115c:a1e0:ab13::{i}") for i in range(1, 20)]
D4 = [ip(f"203.0.113.{i}") for i in range(1, 20)]
D6 = [ip(f"2001:db8::{i}") for i in range(1, 20)]


def make_store() -> MappingStore:
    """The store every table here gets (tests/daemon/test_connector_on_datapath.py runs
    these tests again with the daemon's, the datapath's transit table)."""
    return PackedStore()


def new_table(cfg: NodeConfig, **kw) -> ConnectorTable:
    return ConnectorTable(cfg, store=make_store(), **kw)


def node_config(
    *,
    advertise: bool = True,
    apps: tuple[App, ...] = (GITHUB, OTHER, GITLAB),
    denied: frozenset[str] = frozenset({"intruder"}),
    tailnet: Tailnet = TAILNET,
) -> NodeConfig:
    return NodeConfig(
        tailnet=tailnet,
        node=CONNECTOR,
        advertise_connector=advertise,
        apps=apps,
        pools=config.DEFAULT_POOLS,
        app_users=frozenset(n.name for n in tailnet.nodes) - denied,
    )


def item(transit, dest, app: str = "GitHub", domain: str | None = None) -> TransitIPRequest:
    return TransitIPRequest(str(transit), str(dest), app, domain)


def req(*items: TransitIPRequest) -> ConnectorTransitIPRequest:
    return ConnectorTransitIPRequest(list(items))


def codes(resp: peerapi.ConnectorTransitIPResponse) -> list[int]:
    return [r.code for r in resp.transit_ips]


@pytest.fixture
def table() -> ConnectorTable:
    t = new_table(node_config())
    # Everything the tests map to was "served" by this connector at t=0.
    t.note_resolution("GitHub", "github.com", [(d, 3600) for d in D4 + D6], 0.0)
    t.note_resolution("GitLab", "gitlab.com", [(D4[0], 3600)], 0.0)
    return t


def test_many_v4_and_v6_mappings_register_and_look_up(table):
    """One or many, v4 or v6, are OK; (peer, transit) then gives the destination."""
    resp = table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 1.0)
    assert codes(resp) == [Code.OK] and resp.transit_ips[0].message == ""
    resp = table.handle_request(
        LAPTOP, req(item(T4[1], D4[1]), item(T6[0], D6[0]), item(T6[1], D6[1])), 2.0
    )
    assert codes(resp) == [Code.OK] * 3
    v4, v6 = LAPTOP.address(4), LAPTOP.address(6)
    assert table.lookup(v4, T4[0]).destination == D4[0]
    assert table.lookup(v4, T4[1]).destination == D4[1]
    # v6 transit IPs are keyed by the peer's v6 address, which the datapath sees.
    assert table.lookup(v6, T6[1]) == Mapping(v6, T6[1], D6[1], "GitHub", 2.0, "laptop")
    assert table.lookup(v4, T6[1]) is None
    assert table.lookup(v6, T4[0]) is None
    assert len(table) == 4


def test_register_returns_the_stored_mappings(table):
    resp, stored = table.register(LAPTOP, req(item(T4[0], D4[0]), item(T4[1], D6[0])), 1.0)
    assert codes(resp) == [Code.OK, Code.FAMILY_MISMATCH]
    assert stored == [Mapping(LAPTOP.address(4), T4[0], D4[0], "GitHub", 1.0, "laptop")]


def test_registering_again_replaces_the_destination(table):
    """Registering a known transit IP again replaces its destination."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 1.0)
    assert codes(table.handle_request(LAPTOP, req(item(T4[0], D4[1])), 2.0)) == [Code.OK]
    m = table.lookup(LAPTOP.address(4), T4[0])
    assert (m.destination, m.registered) == (D4[1], 2.0)
    assert len(table) == 1


def test_duplicate_transit_in_one_request_gets_code_2_others_handled(table):
    """The repeat gets code 2; the first occurrence and the rest are handled."""
    resp = table.handle_request(
        LAPTOP, req(item(T4[0], D4[0]), item(T4[0], D4[1]), item(T4[1], D4[2])), 1.0
    )
    assert codes(resp) == [Code.OK, Code.DUPLICATE_TRANSIT_IP, Code.OK]
    assert "more than once" in resp.transit_ips[1].message
    assert table.lookup(LAPTOP.address(4), T4[0]).destination == D4[0]
    assert table.lookup(LAPTOP.address(4), T4[1]).destination == D4[2]


def test_duplicate_of_a_failed_item_is_still_a_duplicate(table):
    """As upstream, any transit IP seen before in the request counts."""
    resp = table.handle_request(LAPTOP, req(item(T4[0], D6[0]), item(T4[0], D4[0])), 1.0)
    assert codes(resp) == [Code.FAMILY_MISMATCH, Code.DUPLICATE_TRANSIT_IP]
    assert table.lookup(LAPTOP.address(4), T4[0]) is None


def test_same_transit_from_two_peers_is_independent(table):
    """Keyed per peer; two transit IPs may map to one destination."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0]), item(T4[1], D4[0])), 1.0)
    table.handle_request(PHONE, req(item(T4[0], D4[5])), 1.0)
    assert table.lookup(LAPTOP.address(4), T4[0]).destination == D4[0]
    assert table.lookup(LAPTOP.address(4), T4[1]).destination == D4[0]
    assert table.lookup(PHONE.address(4), T4[0]).destination == D4[5]
    table.handle_request(PHONE, req(item(T4[0], D4[6])), 2.0)
    assert table.lookup(LAPTOP.address(4), T4[0]).destination == D4[0]


def test_peer_without_address_of_the_family_gets_code_3(table):
    """A peer with no address of the transit IP's family: code 3. Transit and destination of
    different families: code 4."""
    resp = table.handle_request(PHONE, req(item(T6[0], D6[0]), item(T4[0], D4[0])), 1.0)
    assert codes(resp) == [Code.NO_PEER_FAMILY, Code.OK]
    assert "family" in resp.transit_ips[0].message
    resp = table.handle_request(V6ONLY, req(item(T4[1], D4[1])), 1.0)
    assert codes(resp) == [Code.NO_PEER_FAMILY]


def test_family_mismatch_gets_code_4_before_the_peer_family_check(table):
    """The family check comes first, as upstream."""
    resp = table.handle_request(
        LAPTOP, req(item(T4[0], D6[0]), item(T6[0], D4[0])), 1.0
    )
    assert codes(resp) == [Code.FAMILY_MISMATCH, Code.FAMILY_MISMATCH]
    assert codes(table.handle_request(PHONE, req(item(T6[0], D4[0])), 1.0)) == [
        Code.FAMILY_MISMATCH
    ]
    assert len(table) == 0


def test_unknown_app_with_permission_gets_code_5(table):
    """Unknown app, and an app this node does not serve, are both unknown."""
    resp = table.handle_request(
        LAPTOP, req(item(T4[0], D4[0], "NoSuch"), item(T4[1], D4[0], "Other")), 1.0
    )
    assert codes(resp) == [Code.UNKNOWN_APP, Code.UNKNOWN_APP]
    assert "'NoSuch'" in resp.transit_ips[0].message


def test_without_permission_every_app_gets_code_6(table):
    """Permission is checked before the app, so app names cannot be probed."""
    resp = table.handle_request(
        INTRUDER, req(item(T4[0], D4[0], "GitHub"), item(T4[1], D4[0], "NoSuch")), 1.0
    )
    assert codes(resp) == [Code.MISSING_PERMISSION, Code.MISSING_PERMISSION]
    assert resp.transit_ips[0].message == resp.transit_ips[1].message
    assert table.lookup(INTRUDER.address(4), T4[0]) is None


def test_one_result_per_item_in_request_order(table):
    """One result per item, in request order. Not configured: 503. Not POST: 405. Malformed JSON:
    400. Body over 1 MiB: refused."""
    resp = table.handle_request(
        PHONE,
        req(
            item(T4[0], D4[0]),
            item(T4[1], D6[0]),
            item(T6[0], D6[0]),
            item(T4[0], D4[1]),
            item(T4[2], D4[0], "NoSuch"),
            item(ip("198.51.100.1"), D4[0]),
            item(T4[3], D4[1]),
        ),
        1.0,
    )
    assert codes(resp) == [
        Code.OK, Code.FAMILY_MISMATCH, Code.NO_PEER_FAMILY, Code.DUPLICATE_TRANSIT_IP,
        Code.UNKNOWN_APP, Code.OTHER, Code.OK,
    ]


def test_empty_request_gets_empty_response(table):
    assert table.handle_request(LAPTOP, req(), 1.0).transit_ips == []


@pytest.mark.parametrize(
    "cfg",
    [node_config(advertise=False), node_config(apps=(OTHER,)), node_config(apps=())],
    ids=["not-advertising", "no-own-app", "no-apps"],
)
def test_not_configured_refuses_with_503(cfg):
    """A node that serves no app answers 503 and stores nothing."""
    t = new_table(cfg)
    assert not t.configured
    with pytest.raises(NotConfigured):
        t.handle_request(LAPTOP, req(item(T4[0], D4[0])), 1.0)
    raw = peerapi.encode(req(item(T4[0], D4[0])))
    status, _ = peerapi.transit_ip_http("POST", raw, lambda r: t.handle_request(LAPTOP, r, 1.0))
    assert status == 503
    assert len(t) == 0


def test_http_adapter_round_trip(table):
    """The HTTP helper bound to a table answers 200 with the table's codes."""
    raw = peerapi.encode(req(item(T4[0], D4[0]), item(T4[0], D4[0])))
    status, out = peerapi.transit_ip_http(
        "POST", raw, lambda r: table.handle_request(LAPTOP, r, 1.0)
    )
    assert status == 200
    assert codes(peerapi.decode_transit_response(out)) == [Code.OK, Code.DUPLICATE_TRANSIT_IP]


# -- expiry ------------------------------------------------------------


def test_mappings_live_an_hour_from_their_last_registration(table):
    """Mappings live at least an hour from their last registration; empty per-peer tables are
    pruned; a sweep removes a bounded number and leaves the rest for the next."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0]), item(T4[1], D4[1])), 100.0)
    table.handle_request(LAPTOP, req(item(T4[1], D4[1])), 1000.0)
    assert table.sweep(100.0 + MAPPING_LIFETIME, 10) == []
    removed = table.sweep(100.0 + MAPPING_LIFETIME + 0.5, 10)
    assert [m.transit for m in removed] == [T4[0]]
    assert table.lookup(LAPTOP.address(4), T4[0]) is None
    assert table.lookup(LAPTOP.address(4), T4[1]) is not None
    assert [m.transit for m in table.sweep(1000.0 + MAPPING_LIFETIME + 0.5, 10)] == [T4[1]]


def test_sweep_is_bounded_and_leaves_the_rest_for_next_time(table):
    """Mappings live at least an hour from their last registration; empty per-peer tables are
    pruned; a sweep removes a bounded number and leaves the rest for the next."""
    table.handle_request(LAPTOP, req(*(item(T4[i], D4[i]) for i in range(5))), 0.0)
    later = MAPPING_LIFETIME + 1
    assert [len(table.sweep(later, 2)) for _ in range(4)] == [2, 2, 1, 0]
    assert len(table) == 0
    assert table.sweep(later, 0) == []


def test_sweep_prunes_empty_peer_tables(table):
    """Once a peer's last mapping goes, the peer is gone from the state too."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0])), 2000.0)
    assert [p.name for p in table.state().peers] == ["laptop", "phone"]
    table.sweep(MAPPING_LIFETIME + 1, 10)
    assert [p.name for p in table.state().peers] == ["phone"]


def test_packed_store_drops_a_peer_with_its_last_mapping():
    """Memory: no empty per-peer dicts are left behind."""
    t = ConnectorTable(node_config())
    t.note_resolution("GitHub", "github.com", [(D4[0], 3600)], 0.0)
    t.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    t.handle_request(PHONE, req(item(T4[0], D4[0])), 2000.0)
    assert isinstance(t.store, PackedStore)
    assert t.store._peers.keys() == {LAPTOP.address(4), PHONE.address(4)}
    t.sweep(MAPPING_LIFETIME + 1, 10)
    assert t.store._peers.keys() == {PHONE.address(4)}
    t.sweep(MAPPING_LIFETIME + 2001, 10)
    assert t.store._peers == {}


def test_sweep_goes_by_registration_time_across_peers(table):
    """The oldest registrations go first, whichever peer they belong to."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0]), item(T4[1], D4[1])), 10.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0])), 20.0)
    table.handle_request(LAPTOP, req(item(T4[2], D4[2]), item(T6[0], D6[0])), 30.0)
    table.handle_request(PHONE, req(item(T4[1], D4[1])), 40.0)
    table.handle_request(LAPTOP, req(item(T4[0], D4[3])), 50.0)  # moves T4[0] to the end
    later = 50.0 + MAPPING_LIFETIME + 1
    swept = [(m.peer_name, m.transit, m.registered) for m in table.sweep(later, 3)]
    assert swept == [("laptop", T4[1], 10.0), ("phone", T4[0], 20.0), ("laptop", T4[2], 30.0)]
    swept = [(m.peer_name, m.transit, m.registered) for m in table.sweep(later, 2)]
    assert swept == [("laptop", T6[0], 30.0), ("phone", T4[1], 40.0)]
    assert [p.name for p in table.state().peers] == ["laptop"]  # phone went with its last
    assert [m.transit for m in table.sweep(later, 5)] == [T4[0]]
    assert len(table) == 0 and table.state().peers == []


def test_sweep_stops_at_the_first_mapping_still_alive(table):
    """Nothing younger than an hour goes, and older ones behind it stay for later."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0])), 100.0)
    table.handle_request(LAPTOP, req(item(T4[1], D4[1])), 200.0)
    assert [m.registered for m in table.sweep(150.0 + MAPPING_LIFETIME, 10)] == [0.0, 100.0]
    assert len(table) == 1
    m = table.lookup(LAPTOP.address(4), T4[1])
    assert (m.destination, m.app, m.peer_name, m.registered) == (D4[1], "GitHub", "laptop",
                                                                 200.0)


def test_stored_mappings_keep_every_field_exactly(table):
    """The compact storage gives back what was registered (times to the last bit)."""
    t = 1_763_000_000.123456789
    table.note_resolution("GitHub", "github.com", [(D6[4], 60)], t)
    table.note_resolution("GitLab", "gitlab.com", [(D4[0], 60)], t)
    table.handle_request(LAPTOP, req(item(T6[3], D6[4]), item(T4[5], D4[0], "GitLab")), t)
    assert table.lookup(LAPTOP.address(6), T6[3]) == Mapping(
        LAPTOP.address(6), T6[3], D6[4], "GitHub", t, "laptop")
    assert table.lookup(LAPTOP.address(4), T4[5]) == Mapping(
        LAPTOP.address(4), T4[5], D4[0], "GitLab", t, "laptop")
    assert table.lookup(LAPTOP.address(4), T6[3]) is None  # other family: not a key
    assert table.lookup(LAPTOP.address(6), T4[5]) is None
    assert len(table) == 2


def test_resolution_records_of_v4_and_v6_do_not_mix():
    """An IPv6 address whose integer is an IPv4 one's is another record."""
    t = new_table(node_config())
    v4, v6 = ip("203.0.113.7"), ip("::cb00:7107")
    assert int(v4) == int(v6)
    t.note_resolution("GitHub", "github.com", [(v4, 60)], 0.0)
    assert t.resolutions == 1
    assert codes(t.handle_request(LAPTOP, req(item(T6[0], v6)), 1.0)) == [Code.OTHER]
    assert codes(t.handle_request(LAPTOP, req(item(T4[0], v4)), 1.0)) == [Code.OK]


class SmallResolutions(Resolutions):
    MERGE_AT = 3  # merges into the arrays after every few new addresses


ADDRS = [ip("203.0.113.7"), ip("::cb00:7107"), ip("198.18.0.1"), ip("2001:db8::1"),
         ip("2001:db8::2"), ip("2001:db8:0:0:1::1"), ip("255.255.255.255"), ip("0.0.0.1"),
         ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), ip("::")]


def test_compact_resolution_records_behave_as_a_dict():
    """Records kept in sorted arrays and a small dict of new ones: each address has the
    latest expiry noted for it, before and after merges, IPv4 and IPv6 apart."""
    r, model = SmallResolutions(), {}
    for n in range(60):
        addr, expires = ADDRS[n * 7 % len(ADDRS)], float(n * 13 % 17)
        r.note(addr, expires)
        model[addr] = max(model.get(addr, expires), expires)
        assert len(r) == len(model)
        assert all(r.expiry(a) == model.get(a) for a in ADDRS)
    assert len(r._recent) < SmallResolutions.MERGE_AT and len(r._v4[0]) + len(r._v6[0]) > 0
    assert r.expiry(ip("203.0.113.8")) is None and r.expiry(ip("2001:db8::3")) is None


@given(st.lists(st.tuples(st.sampled_from(ADDRS), st.floats(0, 100), st.booleans(),
                          st.integers(0, 4)), max_size=60))
def test_compact_resolution_records_sweep_only_expired_ones_within_the_budget(ops):
    r, model = SmallResolutions(), {}
    for addr, value, sweep, budget in ops:
        if sweep:
            expired = {a for a, e in model.items() if e < value}
            assert r.sweep(value, budget) == min(budget, len(expired))
            model = {a: e for a, e in model.items()
                     if a not in expired or r.expiry(a) is not None}
            assert len(model) == len(r)
        else:
            r.note(addr, value)
            model[addr] = max(model.get(addr, value), value)
        assert all(r.expiry(a) == model.get(a) for a in ADDRS)


def test_a_shorter_answer_does_not_shorten_a_resolution():
    t = new_table(node_config())
    t.note_resolution("GitHub", "github.com", [(D4[0], 100)], 0.0)
    t.note_resolution("GitHub", "github.com", [(D4[0], 10)], 5.0)  # ends at 15: earlier
    t.sweep(50.0, 10)
    assert t.resolutions == 1
    assert codes(t.handle_request(LAPTOP, req(item(T4[0], D4[0])), 100.0)) == [Code.OK]
    assert codes(t.handle_request(LAPTOP, req(item(T4[1], D4[0])), 100.5)) == [Code.OTHER]


def test_sweep_rejects_negative_limit(table):
    with pytest.raises(ValueError, match="negative"):
        table.sweep(0.0, -1)


def test_sweep_expires_resolution_records():
    """Records go once their TTL has passed, a bounded number per sweep."""
    t = new_table(node_config())
    t.note_resolution("GitHub", "github.com", [(D4[0], 10), (D4[1], 10), (D4[2], 100)], 0.0)
    t.note_resolution("GitHub", "api.github.com", [(D4[0], 50)], 5.0)  # extends D4[0]
    assert t.resolutions == 3
    t.sweep(20.0, 1)
    assert t.resolutions >= 2  # at most one per unit of limit
    t.sweep(20.0, 10)
    assert t.resolutions == 2  # D4[1] went; D4[0] was extended by the later answer
    assert codes(t.handle_request(LAPTOP, req(item(T4[0], D4[0])), 20.0)) == [Code.OK]
    assert codes(t.handle_request(LAPTOP, req(item(T4[1], D4[1])), 20.0)) == [Code.OTHER]
    t.sweep(101.0, 10)
    assert t.resolutions == 0


# -- going further than upstream -----------------------------------------


def test_destination_not_resolved_here_gets_code_1():
    """No open relay; the reason names the destination and the app."""
    t = new_table(node_config())
    resp = t.handle_request(LAPTOP, req(item(T4[0], D4[0])), 1.0)
    assert codes(resp) == [Code.OTHER]
    assert "203.0.113.1" in resp.transit_ips[0].message
    assert "'GitHub' resolved to" in resp.transit_ips[0].message
    assert t.lookup(LAPTOP.address(4), T4[0]) is None


def test_resolution_counts_only_for_its_app_and_its_ttl():
    """A destination that the app's domain does not resolve to from the connector, or a transit IP
    outside the transit pools: code 1 with the reason. Per-peer rate limit."""
    t = new_table(node_config())
    assert t.note_resolution("GitLab", "gitlab.com.", [(D4[0], 60)], 0.0)
    assert codes(t.handle_request(LAPTOP, req(item(T4[0], D4[0], "GitHub")), 1.0)) == [Code.OTHER]
    assert codes(t.handle_request(LAPTOP, req(item(T4[0], D4[0], "GitLab")), 1.0)) == [Code.OK]
    assert codes(t.handle_request(LAPTOP, req(item(T4[1], D4[0], "GitLab")), 60.0)) == [Code.OK]
    assert codes(t.handle_request(LAPTOP, req(item(T4[2], D4[0], "GitLab")), 60.5)) == [
        Code.OTHER
    ]
    # A new answer extends the lifetime; a shorter later one does not shorten it.
    t.note_resolution("GitLab", "gitlab.com", [(D4[0], 300)], 100.0)
    t.note_resolution("GitLab", "gitlab.com", [(D4[0], 1)], 101.0)
    assert codes(t.handle_request(LAPTOP, req(item(T4[3], D4[0], "GitLab")), 399.0)) == [Code.OK]


def test_any_domain_of_the_app_vouches_for_the_destination():
    """The item's domain must be the app's; the answer may come from another of its names."""
    t = new_table(node_config())
    t.note_resolution("GitHub", "github.com", [(D4[0], 60)], 0.0)
    resp = t.handle_request(
        LAPTOP,
        req(
            item(T4[0], D4[0], domain="api.github.com"),
            item(T4[1], D4[0], domain="gitlab.com"),
            item(T4[2], D4[1], domain="github.com"),
        ),
        1.0,
    )
    assert codes(resp) == [Code.OK, Code.OTHER, Code.OTHER]
    assert "gitlab.com. is not a domain of app 'GitHub'" in resp.transit_ips[1].message
    assert "203.0.113.2" in resp.transit_ips[2].message


def test_note_resolution_refuses_foreign_domains_and_apps():
    """A client cannot get an arbitrary name resolved into the allowed set."""
    t = new_table(node_config())
    assert not t.note_resolution("GitHub", "evil.example.", [(D4[0], 60)], 0.0)
    assert not t.note_resolution("Other", "example.com", [(D4[0], 60)], 0.0)  # not served here
    assert not t.note_resolution("NoSuch", "github.com", [(D4[0], 60)], 0.0)
    assert t.resolutions == 0
    assert codes(t.handle_request(LAPTOP, req(item(T4[0], D4[0])), 1.0)) == [Code.OTHER]


def test_needs_resolution_lists_unknown_destinations_with_a_domain():
    """The daemon resolves these pairs freshly before handling the request."""
    t = new_table(node_config())
    t.note_resolution("GitHub", "github.com", [(D4[0], 60)], 0.0)
    r = req(
        item(T4[0], D4[0], domain="github.com"),  # already known
        item(T4[1], D4[1], domain="api.github.com"),
        item(T4[2], D4[2], domain="api.github.com"),  # same pair once
        item(T4[3], D4[3]),  # no domain: nothing to resolve
        item(T4[4], D4[4], domain="gitlab.com"),  # not GitHub's
        item(T4[5], D4[5], "GitLab", domain="gitlab.com"),
        item(T4[6], D4[6], "NoSuch", domain="github.com"),
    )
    assert t.needs_resolution(LAPTOP, r, 1.0) == [
        ("GitHub", "api.github.com."), ("GitLab", "gitlab.com.")
    ]
    assert t.needs_resolution(INTRUDER, r, 1.0) == []
    # The contract: resolve, note, then handle.
    t.note_resolution("GitHub", "api.github.com.", [(D4[1], 30), (D4[2], 30)], 1.0)
    assert codes(t.handle_request(LAPTOP, r, 1.0))[:3] == [Code.OK, Code.OK, Code.OK]


def test_needs_resolution_is_bounded_by_the_rate_limit():
    t = new_table(node_config(), rate=1.0, burst=2)
    r = req(*(item(T4[i], D4[i], domain=f"h{i}.github.com") for i in range(5)))
    assert len(t.needs_resolution(LAPTOP, r, 0.0)) == 2


def test_transit_outside_the_pools_gets_code_1(table):
    """A destination that the app's domain does not resolve to from the connector, or a transit IP
    outside the transit pools: code 1 with the reason. Per-peer rate limit."""
    resp = table.handle_request(LAPTOP, req(item(ip("198.51.100.7"), D4[0])), 1.0)
    assert codes(resp) == [Code.OTHER]
    assert resp.transit_ips[0].message == (
        "transit IP 198.51.100.7 is outside laptop's transit IP pools"
    )


def test_transit_is_checked_against_the_clients_pools_not_ours():
    """A client whose pool attribute differs from the connector's is judged by its own."""
    from conn25.core.config import NodeAttr, Pools
    from conn25.core.iprange import IPRange, IPSet

    laptop_pools = Pools(v4_magic=IPSet.of([IPRange.parse("100.90.0.0/24")]),
                         v4_transit=IPSet.of([IPRange.parse("169.254.10.0/24")]))
    tailnet = Tailnet(nodes=TAILNET.nodes, tag_owners=TAILNET.tag_owners,
                      node_attrs=(NodeAttr(target=("laptop",), pools=laptop_pools),))
    t = new_table(node_config(tailnet=tailnet))
    t.note_resolution("GitHub", "github.com", [(D4[0], 3600)], 0.0)
    ours_only, theirs = T4[0], ip("169.254.10.1")
    resp = t.handle_request(LAPTOP, req(item(ours_only, D4[0]), item(theirs, D4[0])), 1.0)
    assert codes(resp) == [Code.OTHER, Code.OK]
    assert t.is_unmapped_transit(LAPTOP.address(4), ip("169.254.10.2"))
    assert not t.is_unmapped_transit(LAPTOP.address(4), ours_only)


@pytest.mark.parametrize(
    ("dest", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.80.0.1", "magic or transit IP pool"),
        ("169.254.200.1", "link-local"),
        ("fd7a:115c:a1e0:ab13::99", "magic or transit IP pool"),
        ("100.64.0.3", "overlay address"),
    ],
)
def test_destinations_that_point_back_inside_are_refused(dest, why):
    """Even when DNS answered them."""
    t = new_table(node_config())
    d = ip(dest)
    t.note_resolution("GitHub", "github.com", [(d, 60)], 0.0)
    transit = T4[0] if d.version == 4 else T6[0]
    resp = t.handle_request(LAPTOP, req(item(transit, d)), 1.0)
    assert codes(resp) == [Code.OTHER]
    assert why in resp.transit_ips[0].message


def test_rate_limit_per_peer():
    """Items beyond the burst get code 1 "rate limited"; tokens come back at the rate."""
    t = new_table(node_config(), rate=2.0, burst=3)
    t.note_resolution("GitHub", "github.com", [(d, 3600) for d in D4], 0.0)
    resp = t.handle_request(LAPTOP, req(*(item(T4[i], D4[i]) for i in range(5))), 0.0)
    assert codes(resp) == [Code.OK] * 3 + [Code.OTHER] * 2
    assert resp.transit_ips[3].message == "rate limited"
    # Another peer has its own bucket.
    assert codes(t.handle_request(PHONE, req(item(T4[0], D4[0])), 0.0)) == [Code.OK]
    # One second later: two more tokens.
    resp = t.handle_request(LAPTOP, req(*(item(T4[i], D4[i]) for i in range(3, 6))), 1.0)
    assert codes(resp) == [Code.OK, Code.OK, Code.OTHER]
    # A duplicate costs no token; a clock stepping back refills nothing.
    resp = t.handle_request(LAPTOP, req(item(T4[9], D4[9]), item(T4[9], D4[9])), 0.5)
    assert codes(resp) == [Code.OTHER, Code.DUPLICATE_TRANSIT_IP]


def test_rate_limit_arguments_are_checked():
    with pytest.raises(ValueError, match="rate limit"):
        new_table(node_config(), rate=0.0)
    with pytest.raises(ValueError, match="rate limit"):
        new_table(node_config(), burst=0)


# -- datapath queries, reconfiguration --------------------------------------------


def test_unmapped_transit_in_the_pools_is_rejected(table):
    """(table side): in a transit pool but not mapped for this peer."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    assert not table.is_unmapped_transit(LAPTOP.address(4), T4[0])
    assert table.is_unmapped_transit(PHONE.address(4), T4[0])
    assert table.is_unmapped_transit(LAPTOP.address(4), T4[1])
    assert not table.is_unmapped_transit(LAPTOP.address(4), ip("198.51.100.1"))
    assert not new_table(node_config(advertise=False)).is_unmapped_transit(
        LAPTOP.address(4), T4[1]
    )


def test_reconfigure_drops_mappings_the_new_config_does_not_allow(table):
    table.handle_request(LAPTOP, req(item(T4[0], D4[0]), item(T6[0], D6[0])), 0.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0], "GitLab")), 0.0)
    # laptop loses permission; GitLab stays served.
    removed = table.reconfigure(node_config(denied=frozenset({"laptop"})))
    assert sorted(str(m.transit) for m in removed) == [str(T4[0]), str(T6[0])]
    assert {m.peer_name for m in removed} == {"laptop"}
    assert table.lookup(PHONE.address(4), T4[0]) is not None
    # GitLab no longer offered: its mapping and its resolution records go.
    removed = table.reconfigure(node_config(apps=(GITHUB,)))
    assert [m.app for m in removed] == ["GitLab"]
    assert len(table) == 0
    assert codes(table.handle_request(PHONE, req(item(T4[1], D4[0], "GitLab")), 0.0)) == [
        Code.UNKNOWN_APP
    ]


def test_reconfigure_drops_mappings_of_peers_that_left_or_moved(table):
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0])), 0.0)
    moved = Member("phone", (ip("100.64.0.9"),), PHONE.endpoint, PHONE.public_key, user=PHONE.user)
    tn = Tailnet(nodes=(moved, CONNECTOR), tag_owners=TAILNET.tag_owners)
    removed = table.reconfigure(node_config(tailnet=tn))
    assert {m.peer_name for m in removed} == {"laptop", "phone"}
    assert len(table) == 0


def test_reconfigure_to_unconfigured_drops_everything(table):
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    assert len(table.reconfigure(node_config(advertise=False))) == 1
    assert not table.configured
    assert table.resolutions == 0


# -- persistence: mappings survive a restart (flows in flight come back) --------


def test_snapshot_and_restore_keep_mappings_and_their_age(table):
    table.handle_request(LAPTOP, req(item(T4[0], D4[0]), item(T6[0], D6[0])), 10.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0], "GitLab")), 20.0)
    table.handle_request(LAPTOP, req(item(T4[1], D4[2])), 30.0)
    fresh = new_table(node_config())  # no resolution records: restored ones need none
    lines: list[str] = []
    restored = fresh.restore(table.snapshot(), 40.0, lines.append)
    assert lines == [] and len(fresh) == len(table) == 4
    assert {(m.peer_name, str(m.transit), str(m.destination), m.app, m.registered)
            for m in restored} == {
        ("laptop", str(T4[0]), str(D4[0]), "GitHub", 10.0),
        ("laptop", str(T6[0]), str(D6[0]), "GitHub", 10.0),
        ("phone", str(T4[0]), str(D4[0]), "GitLab", 20.0),
        ("laptop", str(T4[1]), str(D4[2]), "GitHub", 30.0)}
    assert msgspec.to_builtins(fresh.state()) == msgspec.to_builtins(table.state())
    # the saved registration time still rules expiry: the first ones go first
    swept = fresh.sweep(10.0 + MAPPING_LIFETIME + 1, 100)
    assert sorted(str(m.transit) for m in swept) == sorted([str(T4[0]), str(T6[0])])


def test_a_snapshot_saves_each_mapping_as_the_mapping_reads(table):
    """The store's rows for a snapshot (text, without a Mapping each) are its mappings':
    two peers, both families, in the store's order."""
    table.handle_request(LAPTOP, req(item(T4[0], D4[0]), item(T6[0], D6[0])), 10.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0], "GitLab")), 20.0)
    rows = list(table.store.saved_rows())
    assert rows == [saved_row(m) for m in table.store] and len(rows) == 3
    assert ("laptop", str(T6[0]), str(D6[0]), 10.0) in {(r[5], r[1], r[2], r[4]) for r in rows}
    assert msgspec.json.decode(table.snapshot()) == [list(r) for r in rows]


def test_a_snapshot_of_many_mappings_is_written_in_pieces_and_reads_back_whole():
    """More mappings than one chunk of rows: the pieces make one JSON array, the rows
    of every mapping once, and a restore gives back exactly the table."""
    t = new_table(node_config(), rate=1e9, burst=10**9)
    n = 2500
    dests = [ip("198.18.0.0") + i for i in range(n)]
    t.note_resolution("GitHub", "github.com", [(d, 3600) for d in dests], 0.0)
    transits = [ip("169.254.128.0") + i for i in range(n)]
    for start in range(0, n, 500):
        t.handle_request(LAPTOP, req(*(item(transits[i], dests[i])
                                       for i in range(start, start + 500))), float(start))
    pieces = list(t.snapshot_chunks())
    assert len(pieces) > 3 and max(map(len, pieces)) < len(b"".join(pieces)) / 2
    data = t.snapshot()
    assert data == b"".join(pieces)
    rows = msgspec.json.decode(data)
    assert len(rows) == n and len({(r[0], r[1]) for r in rows}) == n
    fresh = new_table(node_config())
    assert len(fresh.restore(data, 100.0, print)) == n
    assert msgspec.to_builtins(fresh.state()) == msgspec.to_builtins(t.state())
    assert new_table(node_config()).snapshot() == b"[]"


def test_restore_drops_what_the_configuration_no_longer_allows(table):
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    table.handle_request(PHONE, req(item(T4[0], D4[0], "GitLab")), 0.0)
    table.handle_request(PHONE, req(item(T4[1], D4[1])), 0.0)
    lines: list[str] = []
    fresh = new_table(node_config(denied=frozenset({"laptop"}), apps=(GITHUB,)))
    restored = fresh.restore(table.snapshot(), 1.0, lines.append)
    assert [(m.peer_name, m.app) for m in restored] == [("phone", "GitHub")]
    assert len(lines) == 2
    assert any("peer=laptop" in ln and "not allowed" in ln for ln in lines), lines
    assert any("app=GitLab" in ln and "not served" in ln for ln in lines), lines


def test_restore_leaves_expired_mappings_out_and_refuses_garbage(table):
    table.handle_request(LAPTOP, req(item(T4[0], D4[0])), 0.0)
    fresh = new_table(node_config())
    assert fresh.restore(table.snapshot(), MAPPING_LIFETIME + 1, print) == []
    for bad in (b"{", b'[["100.64.0.1", "x", "203.0.113.1", "GitHub", 0, "laptop"]]', b"{}"):
        with pytest.raises(ValueError, match="bad connector snapshot"):
            fresh.restore(bad, 0.0, print)
    assert len(fresh) == 0
    # a hand-edited file: a destination that is a node's own address, mixed families
    lines: list[str] = []
    doc = (b'[["100.64.0.1", "169.254.128.1", "100.64.0.3", "GitHub", 0, "laptop"],'
           b' ["100.64.0.1", "169.254.128.2", "2001:db8::1", "GitHub", 0, "laptop"]]')
    assert fresh.restore(doc, 1.0, lines.append) == [] and len(lines) == 2


# -- state -------------------------------------------------


def test_state_lists_peers_apps_and_mappings_sorted(table):
    """Peers by name, their apps, transit -> destination by transit IP."""
    table.handle_request(PHONE, req(item(T4[0], D4[0], "GitLab")), 5.0)
    table.handle_request(
        LAPTOP, req(item(T6[0], D6[0]), item(T4[2], D4[2]), item(T4[1], D4[1])), 10.0
    )
    state = msgspec.to_builtins(table.state())
    assert state == {
        "configured": True,
        "apps": ["GitHub", "GitLab"],
        "peers": [
            {
                "name": "laptop",
                "apps": ["GitHub"],
                "mappings": [
                    {"transit": "169.254.128.2", "destination": "203.0.113.2", "app": "GitHub",
                     "expires": 10.0 + MAPPING_LIFETIME},
                    {"transit": "169.254.128.3", "destination": "203.0.113.3", "app": "GitHub",
                     "expires": 10.0 + MAPPING_LIFETIME},
                    {"transit": "fd7a:115c:a1e0:ab13::1", "destination": "2001:db8::1",
                     "app": "GitHub", "expires": 10.0 + MAPPING_LIFETIME},
                ],
            },
            {
                "name": "phone",
                "apps": ["GitLab"],
                "mappings": [
                    {"transit": "169.254.128.1", "destination": "203.0.113.1", "app": "GitLab",
                     "expires": 5.0 + MAPPING_LIFETIME},
                ],
            },
        ],
    }


def test_state_when_not_configured_is_just_that():
    """{configured: false}."""
    t = new_table(node_config(advertise=False))
    assert msgspec.json.decode(msgspec.json.encode(t.state())) == {"configured": False}
