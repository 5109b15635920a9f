"""Client assignments and expiry: BEHAVIOURS 29-35, 38."""

import ipaddress
import json

import pytest

from conn25.core.assignments import (
    EXTEND,
    MAX_TTL,
    Assignment,
    AssignmentError,
    Assignments,
    PoolExhausted,
    clamp_ttl,
)
from conn25.core.config import Pools
from conn25.core.iprange import IPRange, IPSet

T0 = 1_700_000_000.0


def ip(s):
    return ipaddress.ip_address(s)


def pools(v4_magic="100.80.0.0-100.80.0.3", v4_transit="169.254.128.0-169.254.128.3"):
    def s(r):
        return IPSet.of([IPRange.parse(r)])

    return Pools(
        v4_magic=s(v4_magic),
        v4_transit=s(v4_transit),
        v6_magic=s("fd7a:115c:a1e0:ab12::-fd7a:115c:a1e0:ab12::3"),
        v6_transit=s("fd7a:115c:a1e0:ab13::-fd7a:115c:a1e0:ab13::3"),
    )


@pytest.fixture
def store():
    return Assignments(pools())


def test_reserve_creates_once_and_lookups_agree(store):
    a, created = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 300, T0)
    assert created
    assert (str(a.magic), str(a.transit)) == ("100.80.0.0", "169.254.128.0")
    assert store.by_magic(a.magic) is a
    assert store.by_transit(a.transit) is a
    assert store.by_domain_real("github.com.", ip("203.0.113.10")) is a
    assert len(store) == 1


@pytest.mark.parametrize("real", ["203.0.113.10", "2001:db8::10"])
def test_reserving_the_same_pair_twice_gives_the_same_assignment(store, real):
    """(v4 and v6)."""
    a, _ = store.reserve("GitHub", "github.com.", ip(real), 300, T0)
    b, created = store.reserve("GitHub", "github.com.", ip(real), 300, T0 + 5)
    assert b is a and not created
    assert a.magic.version == a.transit.version == ip(real).version
    assert len(store) == 1


def test_insert_refuses_taken_keys_even_when_expired(store):
    """An assignment cannot be inserted over an existing magic, transit or (domain, real) key, even
    an expired one, until it has been reclaimed."""
    a, _ = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 60, T0)
    assert store.expired(T0 + 3600) == [a]
    for clash in (
        Assignment(a.magic, ip("169.254.128.3"), ip("203.0.113.99"), "x", "x.", T0),
        Assignment(ip("100.80.0.3"), a.transit, ip("203.0.113.99"), "x", "x.", T0),
        Assignment(ip("100.80.0.3"), ip("169.254.128.3"), a.real, "GitHub", "github.com.", T0),
    ):
        with pytest.raises(AssignmentError, match="already assigned"):
            store.insert(clash)
    assert len(store) == 1


def test_ttl_clamp():
    """Expiry = TTL clamped to [1 min, 72 h] (300 → 300 s, 1 → 60 s, 10^6 → 72 h); a repeated
    answer moves expiry to now + TTL."""
    assert (clamp_ttl(300), clamp_ttl(1), clamp_ttl(10**6)) == (300, 60, MAX_TTL)


def test_repeated_answer_moves_expiry_to_now_plus_ttl(store):
    """Expiry = TTL clamped to [1 min, 72 h] (300 → 300 s, 1 → 60 s, 10^6 → 72 h); a repeated
    answer moves expiry to now + TTL."""
    a, _ = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 300, T0)
    assert a.expiry == T0 + 300
    store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 1, T0 + 100)
    assert a.expiry == T0 + 100 + 60


def test_expired_oldest_first_only_after_their_time_and_after_changes(store):
    """Expired assignments come out oldest first, and only after their time; changing an expiry
    keeps the order right."""
    a, _ = store.reserve("A", "a.", ip("203.0.113.1"), 100, T0)
    b, _ = store.reserve("A", "b.", ip("203.0.113.2"), 200, T0)
    c, _ = store.reserve("A", "c.", ip("203.0.113.3"), 300, T0)
    assert store.expired(T0 + 99) == []
    assert store.expired(T0 + 100) == [a]
    assert store.expired(T0 + 1000) == [a, b, c]
    # a gets a later expiry than c: order follows
    store.reserve("A", "a.", ip("203.0.113.1"), 400, T0)
    assert store.expired(T0 + 1000) == [b, c, a]
    assert store.expired(T0 + 250) == [b]


def test_reclaim_on_next_new_assignment_returns_both_addresses(store):
    """Expired, no flow ever -> reclaimed when the next new assignment is made."""
    a, _ = store.reserve("A", "a.", ip("203.0.113.1"), 60, T0)
    b, _ = store.reserve("A", "b.", ip("203.0.113.2"), 60, T0 + 61)
    assert store.by_magic(a.magic) is None and store.by_transit(a.transit) is None
    assert store.pool_usage()["v4Magic"] == {"inUse": 1, "capacity": 4}
    assert store.pool_usage()["v4Transit"]["inUse"] == 1
    assert len(store) == 1 and store.by_magic(b.magic) is b


def test_active_flow_or_recent_flow_moves_expiry_24h(store):
    """An active flow, or one ended under 2 minutes ago, keeps it (expiry +24 h)."""
    a, _ = store.reserve("A", "a.", ip("203.0.113.1"), 60, T0)
    b, _ = store.reserve("A", "b.", ip("203.0.113.2"), 60, T0)
    c, _ = store.reserve("A", "c.", ip("203.0.113.3"), 60, T0)
    store.flow_started(a.transit, T0)
    store.flow_started(b.transit, T0)
    store.flow_ended(b.transit, T0 + 100)
    store.flow_started(c.transit, T0)
    store.flow_ended(c.transit, T0 + 10)
    now = T0 + 200  # b's flow ended 100 s ago, c's 190 s ago
    removed = store.reclaim(now)
    assert removed == [c]
    assert a.expiry == now + EXTEND and b.expiry == now + EXTEND
    assert a.active_flows == 1 and b.active_flows == 0


def test_expired_but_unreclaimed_is_reused_with_ttl_refreshed(store):
    """An expired but unreclaimed assignment is reused if the same answer comes again, with its TTL
    refreshed."""
    a, _ = store.reserve("A", "a.", ip("203.0.113.1"), 60, T0)
    again, created = store.reserve("A", "a.", ip("203.0.113.1"), 300, T0 + 1000)
    assert again is a and not created and a.expiry == T0 + 1300


def test_exhaustion_is_an_error_and_leaves_no_half_assignment():
    store = Assignments(pools(v4_magic="100.80.0.0-100.80.0.1", v4_transit="169.254.128.0"))
    store.reserve("A", "a.", ip("203.0.113.1"), 300, T0)
    with pytest.raises(PoolExhausted):
        store.reserve("A", "b.", ip("203.0.113.2"), 300, T0)
    usage = store.pool_usage()
    assert usage["v4Magic"]["inUse"] == 1 and usage["v4Transit"]["inUse"] == 1
    assert len(store) == 1


def test_attach(store):
    """Unknown transit or no identity is an error; the same pair twice is harmless."""
    a, _ = store.reserve("A", "a.", ip("203.0.113.1"), 300, T0)
    with pytest.raises(AssignmentError, match="not assigned"):
        store.attach(ip("169.254.200.1"), "gh-connector-1")
    with pytest.raises(AssignmentError, match="identity"):
        store.attach(a.transit, "")
    store.attach(a.transit, "gh-connector-1")
    store.attach(a.transit, "gh-connector-1")
    assert store.by_connector("gh-connector-1") == [a]


def test_snapshot_restore_keeps_addresses(store):
    """Assignments are kept across a restart."""
    a, _ = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 300, T0)
    b, _ = store.reserve("GitHub", "github.com.", ip("2001:db8::10"), 300, T0)
    store.attach(a.transit, "gh-connector-1")
    data = store.snapshot()

    fresh = Assignments(pools())
    assert fresh.restore(data, T0 + 250) == 2
    ra = fresh.by_domain_real("github.com.", ip("203.0.113.10"))
    assert (ra.magic, ra.transit, ra.connector, ra.expiry) == (a.magic, a.transit,
                                                              "gh-connector-1", a.expiry)
    assert fresh.by_magic(b.magic).real == ip("2001:db8::10")
    # restored addresses are in use: the next reservation gets new ones
    c, _ = fresh.reserve("GitHub", "github.com.", ip("203.0.113.11"), 300, T0 + 250)
    assert c.magic != a.magic and c.transit != a.transit
    # expired restored assignments wait out the grace period after the restart
    assert fresh.reclaim(T0 + 310) == []
    assert ra.expiry == T0 + 310 + EXTEND


def test_each_snapshot_has_the_changes_since_the_last_one(store):
    """Rows are re-encoded only when they change: every kind of change must show."""
    def saved(s):
        fresh = Assignments(pools())
        fresh.restore(s.snapshot(), T0)
        return {(str(a.domain), str(a.real)): (a.magic, a.expiry, a.connector) for a in fresh}

    a, _ = store.reserve("A", "a.", ip("203.0.113.1"), 300, T0)
    b, _ = store.reserve("A", "b.", ip("203.0.113.2"), 300, T0)
    assert saved(store) == {("a.", "203.0.113.1"): (a.magic, T0 + 300, None),
                            ("b.", "203.0.113.2"): (b.magic, T0 + 300, None)}
    store.attach(a.transit, "c1")                          # registered
    store.reserve("A", "b.", ip("203.0.113.2"), 600, T0)   # expiry refreshed
    assert saved(store) == {("a.", "203.0.113.1"): (a.magic, T0 + 300, "c1"),
                            ("b.", "203.0.113.2"): (b.magic, T0 + 600, None)}
    assert store.reclaim(T0 + 400) == [a]                  # removed
    c, _ = store.reserve("A", "c.", ip("203.0.113.3"), 300, T0 + 400)
    assert c.magic != a.magic or c.domain != a.domain      # its magic IP may be reused
    assert saved(store) == {("b.", "203.0.113.2"): (b.magic, T0 + 600, None),
                            ("c.", "203.0.113.3"): (c.magic, T0 + 700, None)}


@pytest.mark.parametrize("bad", [b"", b"{", b'[{"magic": 1}]', b'[{"magic":"x","transit":"y",'
                                 b'"real":"z","app":"a","domain":"d.","expiry":1}]'])
def test_restore_rejects_bad_snapshots_and_changes_nothing(bad):
    store = Assignments(pools())
    with pytest.raises(ValueError, match="bad assignment snapshot"):
        store.restore(bad, T0)
    assert len(store) == 0
    assert store.pool_usage()["v4Magic"]["inUse"] == 0


def test_restore_with_duplicate_keys_rolls_back():
    store = Assignments(pools())
    store.reserve("A", "a.", ip("203.0.113.1"), 300, T0)
    data = store.snapshot()
    doubled = data[:-1] + b"," + data[1:]
    fresh = Assignments(pools())
    with pytest.raises(ValueError, match="already assigned"):
        fresh.restore(doubled, T0)
    assert len(fresh) == 0 and fresh.pool_usage()["v4Magic"]["inUse"] == 0


def test_on_reclaim_hears_of_every_reclaimed_assignment_also_inside_reserve():
    """The datapath must forget a reclaimed magic IP at once, whichever call reclaimed it."""
    gone = []
    store = Assignments(pools(), on_reclaim=gone.append)
    a, _ = store.reserve("A", "a.", ip("203.0.113.1"), 60, T0)
    b, _ = store.reserve("A", "b.", ip("203.0.113.2"), 60, T0)
    store.reserve("A", "c.", ip("203.0.113.3"), 60, T0 + 61)  # reclaims a and b on the way
    assert gone == [a, b]
    store.flow_started(store.by_domain_real("c.", ip("203.0.113.3")).transit, T0 + 61)
    assert store.reclaim(T0 + 1000) == [] and gone == [a, b]  # in use: extended, not reclaimed


# -- restored entries the current pools and nodes rule out are dropped -----------------------

NODE_V4, NODE_V6 = ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")


def saved_row(magic: str, transit: str, real: str = "203.0.113.1", domain: str = "a.") -> str:
    return (f'{{"magic":"{magic}","transit":"{transit}","real":"{real}","app":"A",'
            f'"domain":"{domain}","expiry":{T0 + 300}}}')


def restore_rows(store: Assignments, *rows: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    n = store.restore(("[" + ",".join(rows) + "]").encode(), T0,
                      node_addresses=[NODE_V4, NODE_V6], report=lines.append)
    return n, lines


GOOD_ROW = saved_row("100.80.0.1", "169.254.128.1", domain="good.")


@pytest.mark.parametrize(("row", "why"), [
    (saved_row("100.64.0.2", "169.254.128.2"), "magic IP is a node's address"),
    (saved_row("100.80.0.2", "100.64.0.2"), "transit IP is a node's address"),
    (saved_row("100.79.255.255", "169.254.128.2"), "magic IP outside the v4 magic pool"),
    (saved_row("100.80.0.2", "169.254.129.0"), "transit IP outside the v4 transit pool"),
    (saved_row("fd7a:115c:a1e0:ab12::ff", "fd7a:115c:a1e0:ab13::", "2001:db8::1"),
     "magic IP outside the v6 magic pool"),
    (saved_row("fd7a:115c:a1e0:ab12::", "fd7a:115c:a1e0::2", "2001:db8::1"),
     "transit IP is a node's address"),
])
def test_restore_drops_entries_unusable_now_each_with_one_line(row, why):
    """The rest is restored; the dropped one is reported with its addresses and reason."""
    store = Assignments(pools())
    n, lines = restore_rows(store, GOOD_ROW, row)
    assert n == 1 and len(store) == 1
    assert store.by_domain_real("good.", ip("203.0.113.1")) is not None
    assert len(lines) == 1 and "\n" not in lines[0]
    assert why in lines[0] and "saved assignment dropped" in lines[0]
    saved = json.loads(row)
    magic, transit = saved["magic"], saved["transit"]
    assert f"magic {magic}" in lines[0] and f"transit {transit}" in lines[0]
    # nothing of the dropped entry stays in use or findable
    assert store.by_magic(ip(magic)) is None and store.by_transit(ip(transit)) is None
    usage = store.pool_usage()
    assert usage["v4Magic"]["inUse"] == 1 and usage["v4Transit"]["inUse"] == 1
    assert usage["v6Magic"]["inUse"] == 0 and usage["v6Transit"]["inUse"] == 0


def test_restore_reports_every_reason_of_an_entry_in_its_one_line():
    store = Assignments(pools())
    n, lines = restore_rows(store, saved_row("100.64.0.2", "100.64.0.2"))
    assert n == 0 and len(store) == 0
    assert len(lines) == 1
    for why in ("magic IP outside the v4 magic pool", "transit IP outside the v4 transit pool",
                "magic IP is a node's address", "transit IP is a node's address"):
        assert why in lines[0]


def test_restore_after_the_pools_changed_keeps_only_entries_in_the_new_pools():
    """A snapshot made under other pools: entries outside the current ones are dropped."""
    old = Assignments(pools())
    a, _ = old.reserve("A", "a.", ip("203.0.113.1"), 300, T0)
    b, _ = old.reserve("A", "b.", ip("203.0.113.2"), 300, T0)
    assert (str(a.magic), str(b.magic)) == ("100.80.0.0", "100.80.0.1")
    fresh = Assignments(pools(v4_magic="100.80.0.1-100.80.0.4"))
    lines: list[str] = []
    assert fresh.restore(old.snapshot(), T0, report=lines.append) == 1
    assert [x.magic for x in fresh] == [b.magic]
    assert len(lines) == 1 and "magic 100.80.0.0" in lines[0]
    # the dropped entry's (domain, real) is free for a new assignment
    c, _ = fresh.reserve("A", "a.", ip("203.0.113.1"), 300, T0)
    assert c.magic == ip("100.80.0.2")


def test_restore_without_a_reporter_still_drops():
    store = Assignments(pools())
    assert store.restore(f"[{saved_row('100.64.0.2', '169.254.128.2')}]".encode(), T0,
                         node_addresses=[NODE_V4]) == 0
    assert len(store) == 0


# -- transit IPs offered to a connector ---------------------------------------------------------


def test_taken_transits_are_out_of_the_pool_until_an_assignment_holds_them_or_they_return():
    store = Assignments(pools(v4_transit="169.254.128.0-169.254.128.7"))
    offers = store.take_transits(4, 8)
    assert len(offers) == 4  # never more than half of what is free
    a, created = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 300, T0,
                               transit=offers[1])
    assert created and a.transit == offers[1] and store.by_transit(offers[1]) is a
    # An ordinary reservation gets none of the offers.
    b, _ = store.reserve("GitHub", "github.com.", ip("203.0.113.11"), 300, T0)
    assert b.transit not in offers
    store.release_transits(offers)  # the one a holds stays
    assert store.pool_usage()["v4Transit"]["inUse"] == 2
    with pytest.raises(AssignmentError, match="cannot be given"):
        store.reserve("GitHub", "github.com.", ip("203.0.113.12"), 300, T0, transit=offers[1])
    with pytest.raises(AssignmentError, match="cannot be given"):
        store.reserve("GitHub", "github.com.", ip("2001:db8::1"), 300, T0, transit=offers[0])


def test_an_offer_for_a_pair_that_is_assigned_already_is_not_used():
    store = Assignments(pools(v4_transit="169.254.128.0-169.254.128.7"))
    a, _ = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 300, T0)
    [offer] = store.take_transits(4, 1)
    again, created = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 300, T0,
                                   transit=offer)
    assert again is a and not created and a.transit != offer
    store.release_transits([offer])
    assert store.pool_usage()["v4Transit"]["inUse"] == 1


def test_by_domain_lists_a_names_assignments_and_forgets_reclaimed_ones():
    store = Assignments(pools())
    a, _ = store.reserve("GitHub", "github.com.", ip("203.0.113.10"), 60, T0)
    b, _ = store.reserve("GitHub", "github.com.", ip("2001:db8::10"), 60, T0)
    store.reserve("GitHub", "api.github.com.", ip("203.0.113.10"), 600, T0)
    assert sorted(map(str, (x.real for x in store.by_domain("github.com.")))) == [
        "2001:db8::10", "203.0.113.10"]
    assert store.by_domain("nothing.example.") == []
    assert {x.magic for x in store.reclaim(T0 + 61)} == {a.magic, b.magic}
    assert store.by_domain("github.com.") == [] and len(store.by_domain("api.github.com.")) == 1
