"""IP pools: BEHAVIOURS 7-10."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conn25.core.ippool import MAX_CAPACITY, IPPool, PoolError, PoolExhausted
from conn25.core.iprange import IPRange, IPSet


def ip(s):
    return ipaddress.ip_address(s)


def pool(*ranges):
    return IPPool(IPSet.of(IPRange.parse(r) for r in ranges))


def test_order_across_ranges_then_exhausted_repeatedly():
    """In order across ranges, a one-address range too, then exhausted, again and again."""
    p = pool("100.80.0.1-100.80.0.2", "100.80.0.9", "100.80.1.0/31")
    got = [str(p.next()) for _ in range(5)]
    assert got == ["100.80.0.1", "100.80.0.2", "100.80.0.9", "100.80.1.0", "100.80.1.1"]
    for _ in range(3):
        with pytest.raises(PoolExhausted):
            p.next()
    assert p.in_use == 5


def test_returned_addresses_are_handed_out_again():
    """Returned addresses are handed out again; returning one twice, or one that is not the pool's,
    is an error (two different errors)."""
    p = pool("169.254.128.0-169.254.128.2")
    a, b, c = p.next(), p.next(), p.next()
    p.release(b)
    assert p.next() == b
    p.release(a)
    p.release(c)
    assert {p.next(), p.next()} == {a, c}


def test_round_robin_continues_after_a_release():
    p = pool("100.80.0.0-100.80.0.3")
    a = p.next()
    p.next()
    p.release(a)
    # the walk goes on from where it was, not back to the freed address
    assert str(p.next()) == "100.80.0.2"


def test_release_errors_are_distinct():
    """Twice, and not the pool's, are two different errors."""
    p = pool("100.80.0.0/30")
    a = p.next()
    p.release(a)
    with pytest.raises(PoolError, match="not in use"):
        p.release(a)
    with pytest.raises(PoolError, match="does not belong"):
        p.release(ip("198.51.100.7"))


def test_reconfigure_same_set_keeps_position():
    """Reconfiguring with an equal set keeps the position; with a different set, only addresses of
    the new set are handed out, and addresses in use from the old set stay in use until returned
    and are never handed out again."""
    p = pool("100.80.0.0/29")
    p.next()
    p.next()
    p.reconfigure(IPSet.of([IPRange.parse("100.80.0.0-100.80.0.7")]))
    assert str(p.next()) == "100.80.0.2"


def test_reconfigure_new_set_hands_out_only_new_addresses_and_keeps_old_in_use():
    """Reconfiguring with an equal set keeps the position; with a different set, only addresses of
    the new set are handed out, and addresses in use from the old set stay in use until returned
    and are never handed out again."""
    p = pool("100.80.0.0/30")
    old = [p.next(), p.next()]
    p.reconfigure(IPSet.of([IPRange.parse("100.80.0.1-100.80.0.2")]))
    # 100.80.0.1 is still in use from the old set: skipped
    assert str(p.next()) == "100.80.0.2"
    with pytest.raises(PoolExhausted):
        p.next()
    assert p.in_use == 3
    # returning an old address works; one outside the new set is never handed out again
    p.release(old[0])  # 100.80.0.0, outside the new set
    with pytest.raises(PoolExhausted):
        p.next()
    p.release(old[1])  # 100.80.0.1, inside the new set
    assert str(p.next()) == "100.80.0.1"


def test_capacity_saturates_and_unconfigured_is_zero():
    """Capacity saturates at the largest integer for huge IPv6 pools; an unconfigured pool reports
    zero capacity and zero in use."""
    huge = pool("fd7a:115c::/32")
    assert huge.capacity == MAX_CAPACITY
    assert pool("100.80.0.0/24").capacity == 256
    empty = IPPool()
    assert (empty.capacity, empty.in_use) == (0, 0)
    with pytest.raises(PoolExhausted):
        empty.next()


def test_mark_in_use_is_skipped_and_idempotent():
    p = pool("100.80.0.0/31")
    p.mark_in_use(ip("100.80.0.0"))
    p.mark_in_use(ip("100.80.0.0"))
    assert p.in_use == 1
    assert str(p.next()) == "100.80.0.1"
    with pytest.raises(PoolExhausted):
        p.next()


@st.composite
def range_sets(draw):
    starts = draw(st.lists(st.integers(0, 200), min_size=1, max_size=4, unique=True))
    ranges = []
    for s in starts:
        n = draw(st.integers(1, 6))
        ranges.append(IPRange(4, 0x64500000 + s * 8, 0x64500000 + s * 8 + n - 1))
    return IPSet.of(ranges)


@settings(max_examples=200, deadline=None)
@given(range_sets(), st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=80))
def test_pool_model(ranges, ops):
    """Hypothesis: against a set model, never hands out an address twice, only
    addresses of the pool, and is exhausted exactly when everything is in use."""
    p = IPPool(ranges)
    members = {ipaddress.IPv4Address(v) for r in ranges for v in range(r.first, r.last + 1)}
    held: list = []
    for take, pick in ops:
        if take:
            if len(held) == len(members):
                with pytest.raises(PoolExhausted):
                    p.next()
                continue
            a = p.next()
            assert a in members
            assert a not in held
            held.append(a)
        elif held:
            p.release(held.pop(pick % len(held)))
        assert p.in_use == len(held)
    assert p.capacity == len(members)
