"""The one place that writes the datapath's tables, on real tables (no root, no pumps)."""

from __future__ import annotations

import ipaddress

from conn25.core.assignments import Assignments
from conn25.core.config import DEFAULT_POOLS, Member, Tailnet
from conn25.core.connector import Mapping
from conn25.core.policy import node_config
from conn25.daemon.dataplane import Dataplane, Ids
from conn25.fastpath import Tables
from nodekeys import public_key


def ip(text: str):
    return ipaddress.ip_address(text)


LAPTOP = Member("laptop", (ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")), ("192.0.2.1", 41641),
                public_key("laptop"))
C1 = Member("conn-1", (ip("100.64.0.2"),), ("192.0.2.2", 41642), public_key("conn-1"))
C2 = Member("conn-2", (ip("100.64.0.3"),), ("192.0.2.3", 41643), public_key("conn-2"))
TAILNET = Tailnet(nodes=(LAPTOP, C1, C2))
MAGIC = ip("100.80.0.9")
TRANSIT = ip("169.254.128.9")


def plane() -> tuple[Dataplane, Tables]:
    tables = Tables()
    return Dataplane(tables, Ids()), tables


def test_a_config_installs_own_addresses_peers_and_the_client_ranges():
    dp, tables = plane()
    dp.install_config(node_config(TAILNET, "laptop"))
    assert tables.is_local(ip("100.64.0.1")) and not tables.is_local(ip("100.64.0.2"))
    # The tables answer with packed addresses.
    assert tables.lookup_peer(dp.ids.peer("conn-1")) == (ip("192.0.2.2").packed, 41642,
                                                         [ip("100.64.0.2").packed])
    assert tables.lookup_peer(dp.ids.peer("conn-2")) is not None
    assert tables.lookup_peer(dp.ids.peer("laptop")) is None  # not its own peer
    assert tables.lookup_magic(MAGIC) == ("unassigned", None)
    # Not a connector: transit IPs are none of its business.
    assert tables.lookup_transit(dp.ids.peer("conn-1"), TRANSIT) == ("not_ours", None, None)


def test_a_connector_also_gets_every_node_s_transit_ranges():
    dp, tables = plane()
    dp.install_config(node_config(TAILNET, "conn-1", advertise_connector=True))
    assert TRANSIT in DEFAULT_POOLS.v4_transit
    assert tables.lookup_transit(dp.ids.peer("laptop"), TRANSIT) == ("unmapped", None, None)


def test_installing_again_removes_the_peers_the_file_no_longer_has():
    dp, tables = plane()
    dp.install_config(node_config(TAILNET, "laptop"))
    dp.install_config(node_config(Tailnet(nodes=(LAPTOP, C1)), "laptop"))
    assert tables.lookup_peer(dp.ids.peer("conn-1")) is not None
    assert tables.lookup_peer(dp.ids.peer("conn-2")) is None


def test_a_client_assignment_registered_then_forgotten():
    dp, tables = plane()
    store = Assignments(DEFAULT_POOLS)
    a, _ = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 300, 0.0)
    dp.client_registered(a, "conn-2")
    assert tables.lookup_route(a.transit) == dp.ids.peer("conn-2")
    assert tables.lookup_magic(a.magic) == ("hit", a.transit.packed)
    dp.client_forgotten(a)
    assert tables.lookup_route(a.transit) is None
    assert tables.lookup_magic(a.magic) == ("not_ours", None)


def test_a_connector_mapping_stored_then_removed():
    """The ConnectorTable's store is the datapath's transit table: what is put is
    what the datapath translates with (keyed by the peer's id, as the datapath knows
    the peer of a packet), and what is read back is the Mapping."""
    dp, tables = plane()
    store = dp.connector_store
    t = 1_763_000_000.123456789  # kept to the last bit
    m = Mapping(ip("100.64.0.1"), TRANSIT, ip("203.0.113.10"), "GitHub", t, "laptop")
    assert store.put(m) is True
    laptop = dp.ids.peer("laptop")
    assert tables.lookup_transit(laptop, TRANSIT) == ("hit", m.destination.packed,
                                                      dp.ids.app("GitHub"))
    assert store.get(m.peer, TRANSIT) == m and len(store) == 1
    moved = Mapping(m.peer, TRANSIT, ip("203.0.113.11"), "GitLab", t + 1, "laptop")
    assert store.put(moved) is False  # replaced: still one
    assert store.get(m.peer, TRANSIT) == moved and len(store) == 1
    assert tables.lookup_transit(laptop, TRANSIT)[2] == dp.ids.app("GitLab")
    assert store.get(ip("100.64.0.9"), TRANSIT) is None
    assert store.get(m.peer, ip("fd7a:115c:a1e0:ab13::1")) is None  # other family: no key
    assert store.remove(m.peer, TRANSIT) == moved
    assert store.remove(m.peer, TRANSIT) is None
    assert tables.lookup_transit(laptop, TRANSIT) == ("not_ours", None, None)
    assert len(store) == 0 and list(store) == []


def test_the_connector_store_lists_every_mapping_and_the_expired_oldest_first():
    dp, _ = plane()
    store = dp.connector_store
    v4, v6 = ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")
    rows = [Mapping(v4, ip(f"169.254.128.{i}"), ip(f"203.0.113.{i}"), "GitHub", 30.0 - i,
                    "laptop") for i in range(1, 5)]
    rows.append(Mapping(v6, ip("fd7a:115c:a1e0:ab13::1"), ip("2001:db8::1"), "GitLab", 26.0,
                        "phone"))
    rows.append(Mapping(v4, ip("169.254.128.9"), ip("203.0.113.9"), "GitHub", 26.0, "laptop"))
    for m in rows:
        store.put(m)
    assert sorted(store, key=lambda m: m.transit.packed) == sorted(
        rows, key=lambda m: m.transit.packed)
    # Registered before 27: 26.0 (two: IPv4 before IPv6, then by transit), 26.0, 26.0.
    assert [(m.transit, m.registered) for m in store.expired(27.0, 10)] == [
        (ip("169.254.128.4"), 26.0), (ip("169.254.128.9"), 26.0),
        (ip("fd7a:115c:a1e0:ab13::1"), 26.0)]
    assert [m.transit for m in store.expired(28.5, 2)] == [ip("169.254.128.4"),
                                                           ip("169.254.128.9")]
    assert store.expired(0.0, 10) == [] and store.expired(100.0, 0) == []
    assert len(store.expired(100.0, 100)) == len(rows) == len(store)


class Recording:
    """Tables that only record the order of the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append(name)


def test_the_route_is_there_before_the_magic_entry_that_leads_to_it():
    tables = Recording()
    dp = Dataplane(tables, Ids())  # type: ignore[arg-type]
    a, _ = Assignments(DEFAULT_POOLS).reserve("GitHub", "github.com.", ip("203.0.113.10"), 300,
                                              0.0)
    dp.client_registered(a, "conn-1")
    dp.client_forgotten(a)
    assert tables.calls == ["set_route", "set_magic", "del_magic", "del_route"]


def test_ids_are_stable_and_name_their_peer():
    ids = Ids()
    assert [ids.peer("a"), ids.peer("b"), ids.peer("a")] == [1, 2, 1]
    assert ids.peer_name(2) == "b"
    assert ids.peer_name(7) == "peer id 7"
    assert ids.app("GitHub") == ids.app("GitHub") != ids.app("GitLab")
