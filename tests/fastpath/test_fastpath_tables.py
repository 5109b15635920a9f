"""The compiled flow table and mapping tables.

Times are milliseconds. Keys are (proto, src, sport, dst, dport) with packed addresses;
actions are ('src' | 'dst', new address).
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conn25.core.iprange import IPRange
from conn25.fastpath import FlowTable, Tables

TCP, UDP = 6, 17
IDLE = 1000
CLIENT = bytes([100, 64, 0, 1])  # overlay address of the originating client
CONNECTOR = bytes([100, 64, 0, 2])


def magic(i: int) -> bytes:
    return bytes([100, 80, 0, i])


def transit(i: int) -> bytes:
    return bytes([100, 100, 0, i])


def client_flow(i: int, sport: int = 40000) -> tuple:
    """A client-side flow C:sport -> magic(i):443, translated to transit(i)."""
    fwd = (TCP, CLIENT, sport, magic(i), 443)
    rev = (TCP, transit(i), 443, CLIENT, sport)
    return fwd, ("dst", transit(i)), rev, ("src", magic(i))


def insert(ft: FlowTable, i: int, now: int, sport: int = 40000, peer: int = 7) -> tuple:
    fwd, fa, rev, ra = client_flow(i, sport)
    ft.insert(fwd, fa, rev, ra, peer, transit(i), now, app=i)
    return fwd, rev


def removals(events: list) -> list[tuple[str, tuple]]:
    return [(e.reason, e.key) for e in events if e.kind == "removed"]


# ---- flow table: lookups -------------------------------------------------------------


def test_lookup_by_either_key_gives_that_directions_action():
    """Two keys per flow, each with its own action; the flow's data comes along."""
    ft = FlowTable(10, IDLE)
    fwd, rev = insert(ft, 1, now=0)
    out = ft.lookup(fwd, 1)
    assert out is not None
    assert (out.direction, out.rewrite, out.addr) == ("fwd", "dst", transit(1))
    assert (out.peer, out.transit, out.app) == (7, transit(1), 1)
    back = ft.lookup(rev, 2)
    assert back is not None
    assert (back.direction, back.rewrite, back.addr) == ("rev", "src", magic(1))


def test_lookup_in_the_wrong_direction_misses():
    """The reply as seen before translation is the reverse key, nothing else."""
    ft = FlowTable(10, IDLE)
    fwd, rev = insert(ft, 1, now=0)
    proto, src, sport, dst, dport = fwd
    assert ft.lookup((proto, dst, dport, src, sport), 1) is None  # fwd key swapped
    proto, src, sport, dst, dport = rev
    assert ft.lookup((proto, dst, dport, src, sport), 1) is None  # rev key swapped
    assert ft.lookup((TCP, CLIENT, 40000, transit(1), 443), 1) is None  # after translation
    assert ft.lookup((UDP, *fwd[1:]), 1) is None  # other protocol
    assert ft.stats()["misses"] == 4


def test_second_packet_does_not_need_the_mapping_any_more():
    """The flow alone decides; a later flow for a new mapping does not disturb it."""
    ft = FlowTable(10, IDLE)
    fwd, _ = insert(ft, 1, now=0)
    other_fwd, _ = insert(ft, 2, now=1, sport=40001)
    assert ft.lookup(fwd, 2).addr == transit(1)
    assert ft.lookup(other_fwd, 2).addr == transit(2)


def test_ipv6_flows_and_ipaddress_objects():
    ft = FlowTable(10, IDLE)
    c = ipaddress.ip_address("fd7a:115c:a1e0::1")
    m = ipaddress.ip_address("fd7a:115c:a1e0:ab12::5")
    t = ipaddress.ip_address("fd7a:115c:a1e0:cd34::9")
    fwd = (TCP, c, 5000, m, 443)
    rev = (TCP, t.packed, 443, c.packed, 5000)
    ft.insert(fwd, ("dst", t), rev, ("src", m), 3, t, 0)
    hit = ft.lookup((TCP, c.packed, 5000, m.packed, 443), 1)
    assert hit.addr == t.packed and hit.transit == t.packed
    # The IPv4 address with the same leading bytes is a different key.
    assert ft.lookup((TCP, c.packed[:4], 5000, m.packed[:4], 443), 1) is None


def test_counters_count_both_directions():
    ft = FlowTable(10, IDLE)
    fwd, rev = insert(ft, 1, now=0)
    ft.lookup(fwd, 1, nbytes=100)
    ft.lookup(rev, 2, nbytes=40)
    ft.lookup(rev, 3, nbytes=40)
    ft.delete(fwd)
    (ev,) = [e for e in ft.drain_events() if e.kind == "removed"]
    assert (ev.packets, ev.bytes, ev.created, ev.last_used) == (3, 180, 0, 3)


def test_time_going_backwards_does_not_break_expiry():
    """The table keeps the latest `now` it saw; an older one (racing pumps) is harmless."""
    ft = FlowTable(10, IDLE)
    fwd, _ = insert(ft, 1, now=5000)
    assert ft.lookup(fwd, 10) is not None  # earlier than the insert: no underflow, still live
    assert ft.sweep(20, 10) == 0
    assert ft.sweep(5000 + IDLE, 10) == 1


# ---- flow table: collisions, LRU, idle ------------------------------------------------


def test_collision_on_either_key_evicts_the_whole_old_flow():
    """A new flow sharing one key removes the old flow, both of its keys."""
    ft = FlowTable(10, IDLE)
    old_fwd, old_rev = insert(ft, 1, now=0)
    ft.drain_events()
    # New flow: same forward key, translated to another transit IP.
    new_rev = (TCP, transit(2), 443, CLIENT, 40000)
    ft.insert(old_fwd, ("dst", transit(2)), new_rev, ("src", magic(1)), 7, transit(2), 1)
    assert len(ft) == 1
    assert ft.lookup(old_rev, 2) is None  # the old flow's other key went with it
    assert ft.lookup(old_fwd, 2).addr == transit(2)
    events = ft.drain_events()
    assert removals(events) == [("collision", old_fwd)]
    assert [e.kind for e in events] == ["removed", "created"]


def test_collision_via_the_reverse_key_too():
    ft = FlowTable(10, IDLE)
    old_fwd, old_rev = insert(ft, 1, now=0)
    ft.insert((TCP, CLIENT, 1, magic(9), 443), ("dst", transit(1)), old_rev, ("src", magic(9)),
              7, transit(1), 1)
    assert ft.lookup(old_fwd, 2) is None
    assert removals(ft.drain_events()) == [("collision", old_fwd)]


def test_one_new_flow_displaces_two():
    """Forward key of one old flow, reverse key of another: both go."""
    ft = FlowTable(10, IDLE)
    a_fwd, a_rev = insert(ft, 1, now=0)
    b_fwd, b_rev = insert(ft, 2, now=0)
    c_fwd, _ = insert(ft, 3, now=0)
    ft.drain_events()
    ft.insert(a_fwd, ("dst", transit(2)), b_rev, ("src", magic(1)), 7, transit(2), 1)
    assert len(ft) == 2
    assert ft.lookup(a_rev, 2) is None and ft.lookup(b_fwd, 2) is None
    assert ft.lookup(c_fwd, 2) is not None  # bystander untouched
    assert sorted(removals(ft.drain_events())) == sorted(
        [("collision", a_fwd), ("collision", b_fwd)])
    assert ft.stats()["removed_collision"] == 2


def test_a_flow_reusing_a_key_in_the_other_direction_collides():
    """Keys collide whatever direction they had in the old flow."""
    ft = FlowTable(10, IDLE)
    a_fwd, a_rev = insert(ft, 1, now=0)
    ft.insert(a_rev, ("dst", transit(4)), (TCP, transit(4), 2, CLIENT, 3), ("src", CLIENT), 7,
              transit(4), 1)
    assert ft.lookup(a_fwd, 2) is None
    assert ft.lookup(a_rev, 2).direction == "fwd"


def test_equal_keys_are_refused():
    ft = FlowTable(10, IDLE)
    fwd, fa, _, ra = client_flow(1)
    with pytest.raises(ValueError, match="differ"):
        ft.insert(fwd, fa, fwd, ra, 7, transit(1), 0)
    assert len(ft) == 0 and ft.drain_events() == []


def test_capacity_evicts_the_least_recently_used():
    """Full table, new flow: the LRU flow goes (reason lru)."""
    ft = FlowTable(3, IDLE)
    flows = [insert(ft, i, now=i) for i in range(3)]
    ft.drain_events()
    insert(ft, 3, now=10)
    assert len(ft) == 3
    assert ft.lookup(flows[0][0], 11) is None
    assert removals(ft.drain_events()) == [("lru", flows[0][0])]


def test_lookup_from_either_side_counts_as_use():
    """A reply refreshes the flow as much as an outgoing packet."""
    ft = FlowTable(3, IDLE)
    flows = [insert(ft, i, now=0) for i in range(3)]
    ft.lookup(flows[0][1], 1)  # reverse key of the oldest flow
    ft.lookup(flows[1][0], 2)  # forward key of the next one
    ft.drain_events()
    insert(ft, 3, now=3)
    insert(ft, 4, now=4)
    assert removals(ft.drain_events()) == [("lru", flows[2][0]), ("lru", flows[0][0])]


def test_idle_flows_expire_a_bounded_number_per_sweep():
    """Sweep(now, limit) removes at most `limit` idle flows, oldest first."""
    ft = FlowTable(100, IDLE)
    flows = [insert(ft, i, now=i) for i in range(10)]
    ft.lookup(flows[9][1], 500)  # recently used: stays
    ft.drain_events()
    assert ft.sweep(IDLE - 1, 100) == 0  # nothing idle for a whole IDLE yet
    assert ft.sweep(IDLE + 8, 3) == 3
    assert len(ft) == 7
    assert ft.sweep(IDLE + 8, 3) == 3
    assert ft.sweep(IDLE + 8, 3) == 3  # flows 0..8 idle for >= IDLE at 1008
    assert ft.sweep(IDLE + 8, 3) == 0
    assert len(ft) == 1 and ft.lookup(flows[9][0], IDLE + 8) is not None
    assert removals(ft.drain_events()) == [("idle", f[0]) for f in flows[:9]]
    assert ft.sweep(10**9, 0) == 0


def test_lookup_of_an_idle_flow_misses_and_removes_it():
    """Idle expiry holds even if the sweep has not run yet."""
    ft = FlowTable(10, IDLE)
    fwd, rev = insert(ft, 1, now=0)
    assert ft.lookup(rev, IDLE - 1) is not None
    assert ft.lookup(fwd, 2 * IDLE - 2) is not None  # idle just under the timeout
    assert ft.lookup(fwd, 3 * IDLE - 2) is None  # idle for exactly the timeout: expired
    assert len(ft) == 0
    assert removals(ft.drain_events()) == [("idle", fwd)]


# ---- flow table: events ---------------------------------------------------------------


def test_events_fire_exactly_once_per_flow_for_every_removal_kind():
    """Collision, lru, idle, delete and clear each report the flow once."""
    ft = FlowTable(3, IDLE)
    insert(ft, 0, now=0)
    f1, _ = insert(ft, 1, now=0)
    f2, _ = insert(ft, 2, now=0)
    ft.lookup(f1, 10)
    ft.lookup(f2, 10)
    insert(ft, 3, now=10)  # evicts flow 0 (lru)
    ft.insert(f1, ("dst", transit(4)), (TCP, transit(4), 443, CLIENT, 40000),
              ("src", magic(1)), 7, transit(4), 11)  # displaces flow 1
    assert ft.delete(f2)  # flow 2 deleted
    assert not ft.delete(f2)
    assert ft.sweep(10 + IDLE, 10) == 1  # flow 3, idle since 10
    assert ft.clear() == 1  # the flow that displaced flow 1
    assert ft.clear() == 0
    events = ft.drain_events()
    created = Counter(e.transit for e in events if e.kind == "created")
    removed = Counter(e.transit for e in events if e.kind == "removed")
    assert created == removed == Counter({transit(i): 1 for i in range(5)})
    assert {e.transit: e.reason for e in events if e.kind == "removed"} == {
        transit(0): "lru", transit(1): "collision", transit(2): "delete",
        transit(3): "idle", transit(4): "clear"}
    stats = ft.stats()
    assert [stats["removed_" + r] for r in ("lru", "collision", "delete", "idle", "clear")] == [
        1, 1, 1, 1, 1]
    assert ft.drain_events() == []


def test_clear_reports_every_flow():
    """Clearing the table fires the removal for all flows."""
    ft = FlowTable(50, IDLE)
    keys = {insert(ft, i, now=0)[0] for i in range(50)}
    ft.drain_events()
    assert ft.clear() == 50
    assert len(ft) == 0
    events = ft.drain_events()
    assert {e.key for e in events} == keys
    assert len(events) == 50 and {e.reason for e in events} == {"clear"}


def test_created_event_per_new_flow_carries_the_flow_data():
    ft = FlowTable(10, IDLE)
    fwd, _ = insert(ft, 3, now=42, peer=9)
    (ev,) = ft.drain_events()
    assert (ev.kind, ev.reason, ev.transit, ev.peer, ev.key, ev.app, ev.created) == (
        "created", "new", transit(3), 9, fwd, 3, 42)


def test_full_event_ring_counts_drops_and_never_blocks():
    ft = FlowTable(20, IDLE, ring_size=4)
    for i in range(10):
        insert(ft, i, now=0)
    assert len(ft) == 10  # inserts went on regardless
    stats = ft.stats()
    assert stats["events_pending"] == 4 and stats["events_dropped"] == 6
    first = ft.drain_events(max_events=3)
    assert [e.transit for e in first] == [transit(0), transit(1), transit(2)]
    assert [e.transit for e in ft.drain_events()] == [transit(3)]
    ft.clear()
    assert len(ft.drain_events()) == 4
    assert ft.stats()["events_dropped"] == 12


def test_default_ring_holds_a_full_clear():
    ft = FlowTable(100, IDLE)
    for i in range(100):
        insert(ft, i % 250, now=0, sport=1000 + i)
    ft.drain_events()
    ft.clear()
    assert len(ft.drain_events()) == 100 and ft.stats()["events_dropped"] == 0


def test_ring_restarts_at_its_start_when_drained_empty():
    """Drains that empty the ring keep using its first records; order and counts hold."""
    ft = FlowTable(50, IDLE, ring_size=8)
    for round_ in range(6):
        for i in range(5):
            insert(ft, i, now=0, sport=1000 + 10 * round_ + i)  # new keys: creates only
        got = ft.drain_events()
        assert [(e.kind, e.key[2]) for e in got] == [
            ("created", 1000 + 10 * round_ + i) for i in range(5)]
    # A drain that leaves events behind keeps them, in order, across the wrap.
    for i in range(8):
        insert(ft, i, now=0, sport=2000 + i)
    assert [e.key[2] for e in ft.drain_events(max_events=5)] == [2000, 2001, 2002, 2003, 2004]
    for i in range(5):
        insert(ft, i, now=0, sport=3000 + i)
    assert [e.key[2] for e in ft.drain_events()] == [2005, 2006, 2007, 3000, 3001, 3002, 3003,
                                                      3004]
    assert ft.stats()["events_dropped"] == 0


def test_drain_copes_with_more_events_than_one_chunk():
    ft = FlowTable(1000, IDLE)
    for i in range(1000):
        insert(ft, i % 250, now=0, sport=1000 + i)
    events = ft.drain_events(max_events=700)
    assert [e.key[2] for e in events] == list(range(1000, 1700))
    assert [e.key[2] for e in ft.drain_events()] == list(range(1700, 2000))
    assert ft.drain_events() == []


def test_entries_are_used_as_needed_and_removed_ones_first():
    """Memory: an empty table touches no entry; a freed entry is reused before a fresh one."""
    ft = FlowTable(100_000, IDLE)
    assert ft.memory()["entries_used"] == 0 and ft.memory()["entry_bytes"] == 144
    keys = [insert(ft, i, now=0, sport=1000 + i)[0] for i in range(3)]
    assert ft.memory()["entries_used"] == 3
    assert ft.delete(keys[1])
    insert(ft, 9, now=0, sport=5000)
    assert ft.memory()["entries_used"] == 3 and len(ft) == 3
    insert(ft, 10, now=0, sport=5001)
    assert ft.memory()["entries_used"] == 4
    assert ft.lookup(keys[0], now=1) is not None and ft.lookup(keys[1], now=1) is None


def test_a_full_table_uses_every_entry_then_evicts():
    ft = FlowTable(5, IDLE)
    flows = [insert(ft, i, now=i) for i in range(5)]
    assert ft.memory()["entries_used"] == 5 and len(ft) == 5
    insert(ft, 9, now=10)
    assert ft.memory()["entries_used"] == 5 and len(ft) == 5
    assert ft.lookup(flows[0][0], now=11) is None  # the least recently used went
    assert all(ft.lookup(f[0], now=11) is not None for f in flows[1:])


# ---- flow table: bad input ------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 2**30])
def test_bad_capacity(capacity):
    with pytest.raises(ValueError, match="capacity"):
        FlowTable(capacity, IDLE)


@pytest.mark.parametrize("kwargs", [{"idle_timeout_ms": 0}, {"ring_size": 0}])
def test_bad_table_parameters(kwargs):
    with pytest.raises(ValueError):
        FlowTable(10, **kwargs)


@pytest.mark.parametrize(
    "key",
    [
        (TCP, b"\x01\x02\x03", 1, magic(1), 2),  # 3-byte address
        (TCP, CLIENT, 1, b"\x00" * 5, 2),  # 5 bytes
        (TCP, CLIENT, 1, b"\x00" * 16, 2),  # mixed families
        (TCP, "100.64.0.1", 1, magic(1), 2),  # text, not packed
        (TCP, CLIENT, 70000, magic(1), 2),  # port
        (300, CLIENT, 1, magic(1), 2),  # proto
        (TCP, CLIENT, 1, magic(1)),  # too short
        None,
    ],
)
def test_bad_keys_raise_valueerror(key):
    ft = FlowTable(10, IDLE)
    with pytest.raises(ValueError):
        ft.lookup(key, 0)
    with pytest.raises(ValueError):
        ft.delete(key)
    _, fa, rev, ra = client_flow(1)
    with pytest.raises(ValueError):
        ft.insert(key, fa, rev, ra, 7, transit(1), 0)
    assert len(ft) == 0


@pytest.mark.parametrize(
    "args",
    [
        {"fwd_action": ("dst", transit(2))},  # an address of neither key
        {"rev_action": ("src", magic(2))},
        {"transit": transit(2)},
        {"fwd_action": ("dnat", transit(1))},
        {"fwd_action": ("dst", transit(1)[:3])},
        {"fwd_action": ("dst", b"\x00" * 16)},  # family differs from the flow's
        {"transit": b"\x00" * 16},
        {"transit": b""},
        {"peer": -1},
        {"peer": 2**32},
        {"now": -5},
        {"rev": (TCP, b"\x00" * 16, 443, b"\x00" * 16, 40000)},
    ],
)
def test_bad_insert_arguments_raise_valueerror(args):
    ft = FlowTable(10, IDLE)
    fwd, fa, rev, ra = client_flow(1)
    call = {"fwd": fwd, "fwd_action": fa, "rev": rev, "rev_action": ra, "peer": 7,
            "transit": transit(1), "now": 0} | args
    with pytest.raises(ValueError):
        ft.insert(**call)
    assert len(ft) == 0 and ft.drain_events() == []


# ---- flow table: model-based test -----------------------------------------------------

STEP = st.one_of(st.integers(0, 400), st.sampled_from([IDLE - 1, IDLE, IDLE + 1]))
KEYS = [(UDP, CLIENT, p, magic(1), 53) for p in range(4)] + [
    (UDP, transit(1), 53, CLIENT, p) for p in range(4)
]


class Model:
    """The flow table's rules written out the slow, obvious way."""

    def __init__(self, capacity: int, idle: int) -> None:
        self.capacity, self.idle, self.clock = capacity, idle, 0
        self.flows: dict[int, dict] = {}  # flow id -> fwd, rev, last
        self.lru: list[int] = []  # least recently used first
        self.events: list[tuple] = []

    def tick(self, now: int) -> None:
        self.clock = max(self.clock, now)

    def find(self, key: tuple) -> tuple[int, str] | None:
        for fid, f in self.flows.items():
            if key == f["fwd"]:
                return fid, "fwd"
            if key == f["rev"]:
                return fid, "rev"
        return None

    def remove(self, fid: int, reason: str) -> None:
        self.events.append(("removed", reason, fid))
        del self.flows[fid]
        self.lru.remove(fid)

    def insert(self, fid: int, fwd: tuple, rev: tuple, now: int) -> None:
        self.tick(now)
        for key in (fwd, rev):
            hit = self.find(key)
            if hit:
                self.remove(hit[0], "collision")
        if len(self.flows) == self.capacity:
            self.remove(self.lru[0], "lru")
        self.flows[fid] = {"fwd": fwd, "rev": rev, "last": self.clock}
        self.lru.append(fid)
        self.events.append(("created", "new", fid))

    def lookup(self, key: tuple, now: int) -> tuple[int, str] | None:
        self.tick(now)
        hit = self.find(key)
        if hit is None:
            return None
        if self.clock - self.flows[hit[0]]["last"] >= self.idle:
            self.remove(hit[0], "idle")
            return None
        self.flows[hit[0]]["last"] = self.clock
        self.lru.remove(hit[0])
        self.lru.append(hit[0])
        return hit

    def sweep(self, now: int, limit: int) -> int:
        self.tick(now)
        n = 0
        while n < limit and self.lru and self.clock - self.flows[self.lru[0]]["last"] >= self.idle:
            self.remove(self.lru[0], "idle")
            n += 1
        return n


def fid_of(event_or_match) -> int:
    return event_or_match.peer  # each flow of the machine has its own peer number


class FlowTableMachine(RuleBasedStateMachine):
    """The compiled table against Model, step by step, events included."""

    @initialize(capacity=st.integers(1, 3))
    def setup(self, capacity):
        self.ft = FlowTable(capacity, IDLE, seed=capacity)
        self.model = Model(capacity, IDLE)
        self.now = 0
        self.next_fid = 1
        self.created: Counter[int] = Counter()
        self.removed: Counter[int] = Counter()

    def check_events(self) -> None:
        got = [(e.kind, e.reason, fid_of(e)) for e in self.ft.drain_events()]
        assert got == self.model.events
        for kind, _, fid in got:
            (self.created if kind == "created" else self.removed)[fid] += 1
        self.model.events = []

    @rule(fwd=st.sampled_from(KEYS), rev=st.sampled_from(KEYS), dt=STEP)
    def insert(self, fwd, rev, dt):
        if fwd == rev:
            return
        self.now += dt
        fid = self.next_fid
        self.next_fid += 1
        # A translation: the reply comes from the new destination, its SNAT puts back the
        # old one; the transit IP is the new destination.
        self.ft.insert(fwd, ("dst", rev[1]), rev, ("src", fwd[3]), fid, rev[1], self.now)
        self.model.insert(fid, fwd, rev, self.now)
        self.check_events()

    @rule(key=st.sampled_from(KEYS), dt=STEP, back=st.booleans())
    def lookup(self, key, dt, back):
        # `back`: a racing pump's older clock reading.
        now = max(0, self.now - dt) if back else self.now + dt
        self.now = max(self.now, now)
        got = self.ft.lookup(key, now)
        want = self.model.lookup(key, now)
        if want is None:
            assert got is None
        else:
            assert got is not None
            assert (fid_of(got), got.direction) == want
            assert got.rewrite == ("dst" if want[1] == "fwd" else "src")
        self.check_events()

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key):
        hit = self.model.find(key)
        assert self.ft.delete(key) == (hit is not None)
        if hit:
            self.model.remove(hit[0], "delete")
        self.check_events()

    @rule(dt=STEP, limit=st.integers(0, 3))
    def sweep(self, dt, limit):
        self.now += dt
        assert self.ft.sweep(self.now, limit) == self.model.sweep(self.now, limit)
        self.check_events()

    @precondition(lambda self: hasattr(self, "ft"))
    @invariant()
    def size_within_capacity(self):
        assert len(self.ft) == len(self.model.flows) <= self.model.capacity

    def teardown(self):
        if not hasattr(self, "ft"):
            return
        n = len(self.model.flows)
        assert self.ft.clear() == n
        self.model.events = [("removed", "clear", fid) for fid in self.model.lru]
        self.check_events()
        # Every flow ever created was reported removed exactly once.
        assert self.created == self.removed
        assert set(self.created.values()) <= {1}
        assert self.ft.stats()["events_dropped"] == 0


FlowTableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)
test_flow_table_matches_the_model = FlowTableMachine.TestCase


# ---- flow table: threads --------------------------------------------------------------


def test_concurrent_use_keeps_the_invariants():
    """Two 'pumps' insert/lookup/delete while a 'control plane' sweeps and drains.

    Every action is a function of its key, so a torn entry would show as a mismatch.
    """
    capacity = 64
    ft = FlowTable(capacity, IDLE, ring_size=100_000)
    errors: list[BaseException] = []
    drained: list = []
    stop = threading.Event()

    def key_of(i: int) -> tuple:
        fwd, fa, rev, ra = client_flow(i % 200, sport=1000 + i % 97)
        return fwd, fa, rev, ra

    def pump(seed: int) -> None:
        try:
            for n in range(3000):
                i = (n * 7919 + seed) % 1000
                fwd, fa, rev, ra = key_of(i)
                op = n % 3
                if op == 0:
                    ft.insert(fwd, fa, rev, ra, 7, fa[1], n)
                elif op == 1:
                    for key, action in ((fwd, fa), (rev, ra)):
                        hit = ft.lookup(key, n, 60)
                        if hit is not None:
                            assert (hit.rewrite, hit.addr) == action
                else:
                    ft.delete(rev)
                assert len(ft) <= capacity
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def control() -> None:
        try:
            while not stop.is_set():
                ft.sweep(0, 5)  # at the table's own clock
                drained.extend(ft.drain_events())
                assert ft.stats()["flows"] <= capacity
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pump, args=(s,)) for s in (1, 2)]
    ctl = threading.Thread(target=control)
    ctl.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    ctl.join()
    assert errors == []
    ft.clear()
    drained.extend(ft.drain_events())
    stats = ft.stats()
    assert stats["events_dropped"] == 0
    created = [e for e in drained if e.kind == "created"]
    removed = [e for e in drained if e.kind == "removed"]
    assert len(created) == len(removed) == stats["inserts"] == 2000
    assert len(ft) == 0


# ---- tables: routes, magic, transit ---------------------------------------------------


def test_routes_set_replace_delete():
    tb = Tables()
    assert tb.lookup_route(transit(1)) is None
    tb.set_route(transit(1), 5)
    tb.set_route(transit(1), 6)  # replaced in place
    assert tb.lookup_route(transit(1)) == 6
    v6 = transit(1) + bytes(12)
    assert tb.lookup_route(v6) is None  # same leading bytes, other family
    tb.set_route(ipaddress.ip_address("fd00::1"), 2**32 - 1)
    assert tb.lookup_route(ipaddress.ip_address("fd00::1").packed) == 2**32 - 1
    assert tb.del_route(transit(1)) and not tb.del_route(transit(1))
    assert tb.lookup_route(transit(1)) is None
    assert tb.stats()["routes"] == 1


def test_many_routes_survive_growth_and_deletions():
    tb = Tables(seed=3)
    addrs = [i.to_bytes(4, "big") for i in range(5000)]
    for i, a in enumerate(addrs):
        tb.set_route(a, i)
    for a in addrs[::2]:
        assert tb.del_route(a)
    for i, a in enumerate(addrs):
        assert tb.lookup_route(a) == (None if i % 2 == 0 else i)
    assert tb.stats()["routes"] == 2500


def test_ipv4_keys_take_32_byte_slots_and_a_map_fills_to_four_fifths():
    """Memory: an IPv4 entry takes a 32-byte slot (8 bytes of key, the hash, a 4-byte
    address and, on the transit map, the control plane's time and tag), an IPv6 one a
    56-byte slot; each half of a map doubles only past 4/5 full, and keeps every entry."""
    tb = Tables(seed=5)
    mem = tb.memory()
    assert mem["slot_bytes"] == {4: 32, 6: 56}
    assert mem["transit_slots"] == {4: 64, 6: 64}
    assert mem["transit_bytes"] == 64 * 32 + 64 * 56
    peer = 1
    for i in range(51):  # 51 <= 64 * 4/5
        tb.set_transit(peer, i.to_bytes(4, "big"), bytes([198, 18, 0, i]), app=i)
    assert tb.memory()["transit_slots"] == {4: 64, 6: 64}
    tb.set_transit(peer, (51).to_bytes(4, "big"), bytes([198, 18, 0, 51]), app=51)
    assert tb.memory()["transit_slots"] == {4: 128, 6: 64}
    peer6 = 2
    for i in range(52):
        tb.set_transit(peer6, bytes(15) + bytes([i]), bytes.fromhex("20010db8") + bytes(11)
                       + bytes([i]), app=100 + i)
    assert tb.memory()["transit_slots"] == {4: 128, 6: 128}
    for i in range(52):
        assert tb.lookup_transit(peer, i.to_bytes(4, "big")) == ("hit", bytes([198, 18, 0, i]), i)
        assert tb.lookup_transit(peer6, bytes(15) + bytes([i])) == (
            "hit", bytes.fromhex("20010db8") + bytes(11) + bytes([i]), 100 + i)
    assert tb.stats()["transit"] == 104


def test_a_full_map_of_peers_keeps_their_records():
    """The peers map keeps its records' pointers in the slots' value bytes."""
    tb = Tables(seed=1)
    for p in range(1, 40):  # past two doublings of the 16-slot peers map
        tb.set_peer(p, bytes([192, 0, 2, p]), 41641, [bytes([100, 64, 1, p])])
    assert tb.memory()["peers_slots"] == {4: 16, 6: 64}  # ids are in the wide half
    for p in range(1, 40):
        assert tb.lookup_peer(p) == (bytes([192, 0, 2, p]), 41641, [bytes([100, 64, 1, p])])
        assert tb.lookup_route(bytes([100, 64, 1, p])) == p
    assert tb.del_peer(7) and tb.lookup_peer(7) is None and tb.lookup_peer(8) is not None


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 3),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 9)), max_size=200),
)
def test_route_map_matches_a_dict(seed, ops):
    """Open addressing with backward-shift deletion against a dict, many collisions."""
    tb = Tables(seed=seed)
    model: dict[bytes, int] = {}
    for is_set, a, peer in ops:
        addr = bytes([10, 0, 0, a])
        if is_set:
            tb.set_route(addr, peer)
            model[addr] = peer
        else:
            assert tb.del_route(addr) == (model.pop(addr, None) is not None)
    for a in range(41):
        addr = bytes([10, 0, 0, a])
        assert tb.lookup_route(addr) == model.get(addr)
    assert tb.stats()["routes"] == len(model)


def test_magic_hit_unassigned_or_not_ours():
    """With assignment -> transit; in a magic range without -> unassigned."""
    tb = Tables()
    tb.set_magic_ranges([(magic(0), magic(255))])
    assert tb.lookup_magic(magic(1)) == ("unassigned", None)
    assert tb.lookup_magic(CLIENT) == ("not_ours", None)
    tb.set_magic(magic(1), transit(1))
    assert tb.lookup_magic(magic(1)) == ("hit", transit(1))
    tb.set_magic(magic(1), transit(2))
    assert tb.lookup_magic(magic(1)) == ("hit", transit(2))
    assert tb.del_magic(magic(1)) and not tb.del_magic(magic(1))
    assert tb.lookup_magic(magic(1)) == ("unassigned", None)
    tb.set_magic_ranges([])
    assert tb.lookup_magic(magic(1)) == ("not_ours", None)


def test_ranges_accept_iprange_and_both_families():
    tb = Tables()
    tb.set_magic_ranges([IPRange.parse("100.80.0.0/16"), IPRange.parse("fd7a:115c:a1e0:ab12::/64")])
    inside6 = ipaddress.ip_address("fd7a:115c:a1e0:ab12::7")
    outside6 = ipaddress.ip_address("fd7a:115c:a1e0:ab13::7")
    assert tb.lookup_magic(inside6)[0] == "unassigned"
    assert tb.lookup_magic(outside6)[0] == "not_ours"
    assert tb.lookup_magic(bytes([100, 80, 255, 255]))[0] == "unassigned"
    assert tb.lookup_magic(bytes([100, 81, 0, 0]))[0] == "not_ours"
    # The IPv6 address sharing the IPv4 range's leading bytes is not inside it.
    assert tb.lookup_magic(bytes([100, 80, 0, 1]) + bytes(12))[0] == "not_ours"
    assert tb.stats()["magic_ranges"] == 2


def test_transit_is_per_peer_and_ranges_tell_reject_from_not_ours():
    """(peer, transit) known -> real; in a transit range but unmapped -> reject."""
    tb = Tables()
    real = bytes([140, 82, 112, 3])
    client, other = 1, 9
    tb.set_transit_ranges([(transit(0), transit(255))])
    tb.set_transit(client, transit(1), real, app=4)
    assert tb.lookup_transit(client, transit(1)) == ("hit", real, 4)
    assert tb.lookup_transit(other, transit(1)) == ("unmapped", None, None)
    assert tb.lookup_transit(client, real) == ("not_ours", None, None)
    assert tb.del_transit(client, transit(1)) and not tb.del_transit(client, transit(1))
    assert tb.lookup_transit(client, transit(1)) == ("unmapped", None, None)


# ---- tables: peers and anti-spoofing --------------------------------------------------

EP = bytes([192, 0, 2, 10])


def test_peer_lookup_and_allowed_sources():
    """A peer's overlay addresses route to it and are the sources it may send;
    an endpoint is optional (None: known only once the peer made contact)."""
    tb = Tables()
    ov6 = ipaddress.ip_address("fd7a:115c:a1e0::2").packed
    tb.set_peer(2, EP, 41641, [CONNECTOR, ov6])
    assert tb.lookup_peer(2) == (EP, 41641, [CONNECTOR, ov6])
    assert tb.lookup_route(CONNECTOR) == 2 and tb.lookup_route(ov6) == 2
    assert tb.source_ok(2, CONNECTOR) and tb.source_ok(2, ov6)
    assert not tb.source_ok(2, CLIENT) and not tb.source_ok(3, CONNECTOR)
    # A connector's replies come from the transit IPs registered with it.
    assert not tb.source_ok(2, transit(1))
    tb.set_route(transit(1), 2)
    assert tb.source_ok(2, transit(1)) and not tb.source_ok(3, transit(1))
    tb.set_peer(3, None, 0, [CLIENT])
    assert tb.lookup_peer(3) == (None, 0, [CLIENT]) and tb.source_ok(3, CLIENT)


def test_replacing_a_peer_moves_its_endpoint_and_overlay_routes():
    tb = Tables()
    tb.set_peer(2, EP, 41641, [CONNECTOR])
    new_ep = ipaddress.ip_address("2001:db8::10").packed
    new_ov = bytes([100, 64, 0, 22])
    tb.set_peer(2, new_ep, 5000, [new_ov])
    assert tb.lookup_peer(2) == (new_ep, 5000, [new_ov])
    assert tb.lookup_route(CONNECTOR) is None and tb.lookup_route(new_ov) == 2
    assert not tb.source_ok(2, CONNECTOR)
    assert (tb.stats()["peers"], tb.stats()["routes"]) == (1, 1)
    # without a configured endpoint now, the one it had stays where datagrams go
    tb.set_peer(2, None, 0, [new_ov])
    assert tb.lookup_peer(2) == (new_ep, 5000, [new_ov])


def test_two_peers_may_share_an_endpoint():
    """Identity is the key, not the address: peers behind one NAT may share it."""
    tb = Tables()
    tb.set_peer(2, EP, 41641, [CONNECTOR])
    tb.set_peer(3, EP, 41641, [CLIENT])
    assert tb.lookup_peer(3) == (EP, 41641, [CLIENT]) and tb.lookup_route(CLIENT) == 3
    assert tb.lookup_peer(2) == (EP, 41641, [CONNECTOR])


def test_deleting_a_peer_removes_every_route_to_it():
    tb = Tables()
    tb.set_peer(2, EP, 41641, [CONNECTOR])
    tb.set_peer(3, bytes([192, 0, 2, 11]), 41641, [CLIENT])
    for i in range(20):
        tb.set_route(transit(i), 2)
    assert tb.del_peer(2) and not tb.del_peer(2)
    assert tb.lookup_peer(2) is None
    assert tb.stats()["routes"] == 1 and tb.lookup_route(CLIENT) == 3
    assert not tb.source_ok(2, CONNECTOR) and not tb.source_ok(2, transit(3))


# ---- tables: bad input and concurrency ------------------------------------------------


@pytest.mark.parametrize("bad", [b"", b"\x01\x02\x03", b"\x00" * 5, b"\x00" * 17, "10.0.0.1", 7])
def test_tables_reject_bad_address_lengths(bad):
    tb = Tables()
    calls = [
        lambda: tb.set_route(bad, 1),
        lambda: tb.del_route(bad),
        lambda: tb.lookup_route(bad),
        lambda: tb.set_magic(bad, transit(1)),
        lambda: tb.set_magic(magic(1), bad),
        lambda: tb.lookup_magic(bad),
        lambda: tb.del_magic(bad),
        lambda: tb.set_transit(1, bad, transit(2)),
        lambda: tb.set_transit(1, transit(1), bad),
        lambda: tb.lookup_transit(1, bad),
        lambda: tb.del_transit(1, bad),
        lambda: tb.set_magic_ranges([(bad, magic(9))]),
        lambda: tb.set_peer(1, bad, 1, []),
        lambda: tb.set_peer(1, EP, 1, [bad]),
        lambda: tb.source_ok(1, bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"address|expected"):
            call()
    assert set(tb.stats().values()) == {0}


def test_tables_reject_other_bad_input():
    tb = Tables()
    v6 = bytes(16)
    with pytest.raises(ValueError, match="famil"):
        tb.set_magic(magic(1), v6)
    with pytest.raises(ValueError, match="famil"):
        tb.set_transit(1, transit(1), v6)
    with pytest.raises(ValueError, match="uint32"):
        tb.set_transit(2**32, transit(1), transit(2))
    with pytest.raises(ValueError, match="after"):
        tb.set_magic_ranges([(magic(9), magic(1))])
    with pytest.raises(ValueError, match="famil"):
        tb.set_transit_ranges([(magic(1), v6)])
    with pytest.raises(ValueError, match="expected"):
        tb.set_transit_ranges([magic(1)])
    with pytest.raises(ValueError, match="port"):
        tb.set_peer(1, EP, 70000, [])
    with pytest.raises(ValueError, match="uint32"):
        tb.set_route(CLIENT, 2**32)
    with pytest.raises(ValueError, match="overlay"):
        tb.set_peer(1, EP, 1, [bytes([10, 0, 0, i]) for i in range(9)])
    tb.set_magic_ranges([(magic(0), magic(9))])
    with pytest.raises(ValueError):
        tb.set_magic_ranges([(magic(0), magic(9)), (magic(9), magic(0))])
    assert tb.stats()["magic_ranges"] == 1  # a failed replacement leaves the old ranges
    assert set(tb.stats().values()) == {0, 1}


def test_readers_never_see_a_torn_mapping():
    """Entries change atomically: a reader sees the old or the new value, never a mix."""
    tb = Tables()
    m = ipaddress.ip_address("fd00::5").packed
    peer = 1
    values = [bytes([0x11]) * 16, bytes([0x22]) * 16]
    tb.set_magic(m, values[0])
    tb.set_transit(peer, m, values[0], app=0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                status, got = tb.lookup_magic(m)
                assert status == "hit" and got in values
                status, real, app = tb.lookup_transit(peer, m)
                assert status == "hit" and real == values[app]
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for r in readers:
        r.start()
    for n in range(3000):
        tb.set_magic(m, values[n % 2])
        tb.set_transit(peer, m, values[n % 2], app=n % 2)
        tb.set_route(bytes([10, 0, n % 256, n // 256]), n)  # growth under the readers
    stop.set()
    for r in readers:
        r.join()
    assert errors == []
    assert tb.stats()["routes"] == 3000


def test_a_transit_entry_keeps_the_control_planes_time_and_tag():
    """The connector's mappings live in the transit map only: it gives back all of one."""
    tb = Tables(seed=3)
    peer, t1, real = 1, bytes([169, 254, 128, 1]), bytes([203, 0, 113, 1])
    when = 1_763_000_000.123456789
    assert tb.transit_entry(peer, t1) is None
    assert tb.set_transit(peer, t1, real, app=7, registered=when, tag=3) is True  # new
    assert tb.transit_entry(peer, t1) == (real, 7, when, 3)
    assert tb.set_transit(peer, t1, real, app=8, registered=when + 1, tag=4) is False
    assert tb.transit_entry(peer, t1) == (real, 8, when + 1, 4)
    assert tb.lookup_transit(peer, t1) == ("hit", real, 8)
    assert tb.transit_entry(peer, bytes(16)) is None  # the other family: not a key
    assert tb.transit_entry(2, t1) is None  # another peer's
    tb.set_transit(peer, t1, real)  # the datapath's own form: time 0, tag 0
    assert tb.transit_entry(peer, t1) == (real, 0, 0.0, 0)


def test_transit_entries_all_or_the_expired_oldest_first():
    tb = Tables(seed=4)
    p4, p6 = 1, 2
    rows = []
    for i, when in enumerate([50.0, 10.0, 30.0, 10.0]):
        t, r = bytes([169, 254, 128, 10 - i]), bytes([203, 0, 113, i])
        tb.set_transit(p4, t, r, app=1, registered=when, tag=i)
        rows.append((p4, t, r, 1, when, i))
    t6, r6 = bytes([0xFD, 0x7A]) + bytes(13) + b"\x09", bytes([0x20, 0x01, 0x0D, 0xB8]) + bytes(12)
    tb.set_transit(p6, t6, r6, app=2, registered=10.0, tag=9)
    rows.append((p6, t6, r6, 2, 10.0, 9))
    assert sorted(tb.transit_entries()) == sorted(rows)
    # Before 30: the three at 10.0, IPv4 first and by transit IP, then the IPv6 one.
    assert [e[1] for e in tb.transit_entries(30.0)] == [bytes([169, 254, 128, 7]),
                                                       bytes([169, 254, 128, 9]), t6]
    assert [e[4] for e in tb.transit_entries(1e9, 4)] == [10.0, 10.0, 10.0, 30.0]
    assert tb.transit_entries(10.0) == [] and tb.transit_entries(1e9, 0) == []
    for e in rows:
        tb.del_transit(e[0], e[1])
    assert tb.transit_entries() == [] and tb.stats()["real_rev"] == 0


def test_the_same_registration_again_leaves_the_reverse_map_as_it_was():
    """A mapping re-registered unchanged (every registration is written again) must not mark
    a shared reverse entry stale: once the other mapping goes, replies find theirs again."""
    tb = Tables(seed=6)
    c, real = 1, bytes([198, 51, 100, 2])
    t1, t2 = bytes([169, 254, 128, 1]), bytes([169, 254, 128, 2])
    tb.set_transit(c, t1, real, 1)
    tb.set_transit(c, t2, real, 1)
    assert tb.lookup_return(c, real)[0] == "ambiguous"
    tb.set_transit(c, t2, real, 1, registered=5.0)  # t2 again, same destination
    tb.del_transit(c, t1)
    assert tb.lookup_return(c, real) == ("hit", t2, 1)


def test_transit_chunks_walk_every_entry_once():
    tb = Tables(seed=8)
    peer = 1
    for i in range(300):
        tb.set_transit(peer, bytes([169, 254]) + i.to_bytes(2, "big"),
                       bytes([203, 0, 113, i % 256]), app=1, registered=float(i), tag=2)
    seen, start, chunks = [], 0, 0
    while start >= 0:
        rows, start = tb.transit_chunk(start, 64)
        assert len(rows) <= 64
        seen += rows
        chunks += 1
    assert chunks >= 5 and sorted(seen) == sorted(tb.transit_entries())
    assert len({r[1] for r in seen}) == 300
    assert Tables().transit_chunk(0, 10) == ([], -1)
    with pytest.raises(ValueError):
        tb.transit_chunk(0, 0)
