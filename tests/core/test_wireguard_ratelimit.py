"""The per-address handshake rate limit."""

from __future__ import annotations

from conn25.core.wireguard.ratelimit import HandshakeRateLimiter


def test_a_burst_then_the_rate():
    r = HandshakeRateLimiter(rate=20, burst=5)
    assert [r.allow(b"a", 0) for _ in range(6)] == [True] * 5 + [False]
    assert r.allow(b"b", 0)  # another address has its own bucket
    assert not r.allow(b"a", 0.04)  # 0.8 of a token
    assert r.allow(b"a", 0.05)
    assert [r.allow(b"a", 10) for _ in range(6)] == [True] * 5 + [False]  # refilled, capped


def test_the_table_is_bounded_and_forgets_refilled_buckets():
    r = HandshakeRateLimiter(rate=20, burst=5, max_sources=3)
    assert all(r.allow(bytes([i]), 0) for i in range(3))
    # full of recent sources: every newcomer shares one budget, so a flood of new
    # addresses gets no more than one address would
    assert [r.allow(b"new%d" % i, 0.01) for i in range(7)] == [True] * 5 + [False] * 2
    assert r.allow(b"\x00", 0.01)  # the known keep going
    assert len(r) == 4
    assert r.allow(b"later", 1.0) and len(r) <= 4  # refilled buckets were forgotten
