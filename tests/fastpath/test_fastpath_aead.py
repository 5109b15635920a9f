"""The compiled transport crypto (aead.pxd) against the pure-Python reference of
conn25.core.wireguard: sealing and opening as transport.seal/unseal and noise.aead_encrypt
do them (with libsodium, through PyNaCl, an implementation other than the extension's
OpenSSL), the replay window as transport.ReplayWindow.
CONN25_FUZZ_EXAMPLES raises the number of random cases, as for the fuzz targets."""

from __future__ import annotations

import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

from conn25._fastpath import (
    _test_aead_open,
    _test_aead_seal,
    _test_bench_aead,
    _TestAead,
    _TestReplayWin,
)
from conn25.core.wireguard.errors import Rejected
from conn25.core.wireguard.handshake import Keypair
from conn25.core.wireguard.messages import Transport
from conn25.core.wireguard.noise import aead_encrypt
from conn25.core.wireguard.transport import (
    REJECT_AFTER_MESSAGES,
    REPLAY_WINDOW,
    ReplayWindow,
    seal,
    unseal,
)

EXAMPLES = settings(max_examples=int(os.environ.get("CONN25_FUZZ_EXAMPLES", "300")),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])
TAG = 16
RW_BITS = 8192
U64 = (1 << 64) - 1

keys = st.binary(min_size=32, max_size=32)
counters = st.one_of(st.integers(0, 1 << 20), st.integers(0, U64))
payloads = st.binary(max_size=1500)


def keypair(key: bytes) -> Keypair:
    """A session whose sending and receiving key are both `key`: it opens what it seals."""
    return Keypair(send_key=key, receive_key=key, local_index=7, remote_index=7,
                   created=0.0, is_initiator=True)


def libsodium_seal(key: bytes, counter: int, plaintext: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, b"", b"\0\0\0\0" + struct.pack("<Q", counter), key)


# --- sealing and opening ---------------------------------------------------------------


@EXAMPLES
@given(keys, counters, payloads)
def test_seal_is_the_references_and_opens_back(key, counter, payload):
    sealed = _test_aead_seal(key, counter, payload)
    assert len(sealed) == len(payload) + TAG
    assert sealed == aead_encrypt(key, counter, payload, b"")
    assert sealed == libsodium_seal(key, counter, payload)
    # transport.seal is the whole message: a 16-byte header, then this.
    assert seal(keypair(key), counter, payload)[16:] == sealed
    assert _test_aead_open(key, counter, sealed) == payload
    assert unseal(keypair(key), Transport(7, counter, sealed)) == payload


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 63, 64, 65, 1400, 1500, 8192, 65535])
def test_lengths_at_the_block_edges(n):
    key, payload = os.urandom(32), os.urandom(n)
    sealed = _test_aead_seal(key, 1 << 63, payload)
    assert sealed == aead_encrypt(key, 1 << 63, payload, b"")
    assert _test_aead_open(key, 1 << 63, sealed) == payload


@EXAMPLES
@given(keys, counters, payloads, st.data())
def test_a_flipped_bit_anywhere_is_refused(key, counter, payload, data):
    sealed = bytearray(_test_aead_seal(key, counter, payload))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    assert _test_aead_open(key, counter, bytes(sealed)) is None
    with pytest.raises(Rejected):
        unseal(keypair(key), Transport(7, counter, bytes(sealed)))


@EXAMPLES
@given(keys, counters, payloads, st.integers(1, U64))
def test_another_counter_is_refused(key, counter, payload, delta):
    sealed = _test_aead_seal(key, counter, payload)
    assert _test_aead_open(key, (counter + delta) & U64, sealed) is None


@EXAMPLES
@given(keys, keys, counters, payloads)
def test_another_key_is_refused(key, other, counter, payload):
    sealed = _test_aead_seal(key, counter, payload)
    assert (_test_aead_open(other, counter, sealed) is None) == (other != key)


@pytest.mark.parametrize("n", range(TAG))
def test_shorter_than_a_tag_is_refused(n):
    key = os.urandom(32)
    # Even the first n bytes of a genuine empty message (which is just its tag).
    assert _test_aead_open(key, 0, _test_aead_seal(key, 0, b"")[:n]) is None
    assert _test_aead_open(key, 0, bytes(n)) is None


def test_an_empty_message_is_its_tag_alone():
    # A WireGuard keepalive: an empty payload, 16 bytes on the wire after the header.
    key = os.urandom(32)
    sealed = _test_aead_seal(key, 3, b"")
    assert len(sealed) == TAG and sealed == aead_encrypt(key, 3, b"", b"")
    assert _test_aead_open(key, 3, sealed) == b""
    assert _test_aead_open(key, 4, sealed) is None


def test_a_key_is_32_bytes():
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError, match="32 bytes"):
            _test_aead_seal(bad, 0, b"x")
        with pytest.raises(ValueError, match="32 bytes"):
            _test_aead_open(bad, 0, bytes(17))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["seal", "open", "forged"]), st.integers(0, 2),
                          counters, payloads), min_size=1, max_size=12))
def test_one_context_serves_any_keys_in_any_order(steps):
    """A pump thread's one context, used for every peer in both directions: no call leaves
    state (key, direction, a failed tag) that changes the next call's result."""
    ctx, pool = _TestAead(), [bytes([i]) * 32 for i in range(3)]
    for what, k, counter, payload in steps:
        key = pool[k]
        sealed = aead_encrypt(key, counter, payload, b"")
        if what == "seal":
            assert ctx.seal(key, counter, payload) == sealed
        elif what == "open":
            assert ctx.open(key, counter, sealed) == payload
        else:
            assert ctx.open(key, counter, bytes([sealed[0] ^ 1]) + sealed[1:]) is None


def test_contexts_on_several_threads_at_once():
    """One context per thread, all sealing and opening at the same time (GIL released)."""
    errors: list[str] = []

    def work(seed: int) -> None:
        ctx, key = _TestAead(), bytes([seed]) * 32
        for counter in range(300):
            payload = bytes([counter & 0xFF]) * (counter * 5 % 1500)
            sealed = ctx.seal(key, counter, payload)
            if sealed != aead_encrypt(key, counter, payload, b""):
                errors.append(f"thread {seed}: seal {counter}")
            if ctx.open(key, counter, sealed) != payload:
                errors.append(f"thread {seed}: open {counter}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bench_probe_reports_time():
    assert _test_bench_aead(1400, 100) > 0
    assert _test_bench_aead(64, 100, True) > 0
    with pytest.raises(ValueError):
        _test_bench_aead(-1, 1)


# --- the replay window -----------------------------------------------------------------


def test_the_window_is_the_references():
    assert RW_BITS - 64 == REPLAY_WINDOW
    assert REJECT_AFTER_MESSAGES == (1 << 64) - (1 << 13) - 1


class Both:
    """The compiled window and the reference, stepped together; every answer compared."""

    def __init__(self) -> None:
        self.c, self.ref, self.highest = _TestReplayWin(), ReplayWindow(), -1

    def fresh(self, counter: int) -> bool:
        got = self.c.fresh(counter)
        assert got == self.ref.fresh(counter), ("fresh", counter, self.highest)
        assert self.c.next == self.highest + 1    # asking changes nothing
        return got

    def accept(self, counter: int) -> bool:
        got = self.c.accept(counter)
        assert got == self.ref.accept(counter), ("accept", counter, self.highest)
        if got:
            self.highest = max(self.highest, counter)
        assert self.c.next == self.highest + 1
        return got


# A step: (accept or only ask, how the counter is chosen, a number for it).
steps = st.tuples(
    st.booleans(),
    st.sampled_from(["near", "edge", "jump", "limit", "any"]),
    st.integers(0, U64),
)
EDGES = [0, 1, 62, 63, 64, 65, RW_BITS - 129, RW_BITS - 128, RW_BITS - 66, RW_BITS - 65,
         RW_BITS - 64, RW_BITS - 63, RW_BITS - 1, RW_BITS, RW_BITS + 1]


def pick(how: str, x: int, highest: int) -> int:
    h = max(highest, 0)
    if how == "near":         # reordering within and just past the window
        return max(0, h + 300 - x % (RW_BITS + 300))
    if how == "edge":         # a fixed distance below (or above) the highest
        d = EDGES[x % len(EDGES)]
        return h - d if x & (1 << 40) and h >= d else h + d
    if how == "jump":         # the window moves by more than the ring
        return min(h + RW_BITS + x % (1 << 20), U64)
    if how == "limit":
        return REJECT_AFTER_MESSAGES - 3 + x % 6 if x % 7 else U64
    return x


@EXAMPLES
@given(st.integers(0, 3), st.lists(steps, min_size=1, max_size=200))
def test_replay_window_against_the_reference(start, plan):
    w = Both()
    # Start at 0, in the middle of a word, a word's edge, or close to the counter limit.
    base = [0, 1000, 1 << 32, REJECT_AFTER_MESSAGES - 3 * RW_BITS][start]
    if base:
        assert w.accept(base)
    for accept, how, x in plan:
        counter = pick(how, x, w.highest)
        if accept:
            w.accept(counter)
        else:
            w.fresh(counter)


def test_every_counter_of_a_shuffled_window_is_accepted_once():
    import random
    rng = random.Random(25)
    w = Both()
    order = list(range(3 * RW_BITS))
    # Local shuffles only (each counter moves by less than the window), so nothing is lost.
    for i in range(0, len(order), 4000):
        chunk = order[i:i + 4000]
        rng.shuffle(chunk)
        order[i:i + 4000] = chunk
    for c in order:
        assert w.accept(c)
    for c in order[-REPLAY_WINDOW:]:
        assert not w.accept(c)


def test_exactly_the_window_behind():
    w = Both()
    top = 5 * RW_BITS + 17
    assert w.accept(top)
    assert not w.fresh(top - REPLAY_WINDOW)           # RW_BITS - 64 behind: too old
    assert not w.accept(top - REPLAY_WINDOW)
    assert w.accept(top - REPLAY_WINDOW + 1)          # one less: still in the window
    assert not w.accept(top - REPLAY_WINDOW + 1)
    assert w.accept(top - 1) and w.accept(top - 64) and w.accept(top - 65)


def test_counters_in_the_word_the_ring_reuses():
    """The ring has RW_WORDS words; the highest's word and the one RW_WORDS words below are
    the same slot, so the bits kept for a counter there must not leak to the other."""
    w = Both()
    for c in range(64):                 # word 0 full
        assert w.accept(c)
    top = RW_BITS + 63                  # word RW_WORDS, exactly a ring ahead: word 0's slot
    assert w.accept(top)
    # Below the highest, so each is checked against its bit: word 0's old bits must be gone.
    for c in range(top - 1, RW_BITS - 1, -1):
        assert w.accept(c)
    for c in range(64):
        assert not w.fresh(c)           # too old, not "fresh because the slot was cleared"
    assert w.accept(RW_BITS - 1)        # never seen, in the window


def test_a_jump_past_the_window_forgets_it():
    w = Both()
    for c in range(100):
        assert w.accept(c)
    assert w.accept(100 + 10 * RW_BITS)
    assert not w.accept(99) and not w.accept(100 + 9 * RW_BITS)
    assert w.accept(100 + 10 * RW_BITS - 1)
    assert w.accept(U64 >> 1)           # 2^63: a jump of 2^57 words clears the ring once
    assert w.accept((U64 >> 1) - REPLAY_WINDOW + 1)
    assert not w.accept(100 + 10 * RW_BITS - 2)


def test_the_counter_limit():
    w = Both()
    for c in (REJECT_AFTER_MESSAGES, REJECT_AFTER_MESSAGES + 1, U64):
        assert not w.fresh(c) and not w.accept(c)
    assert w.c.next == 0                # nothing accepted
    assert w.accept(REJECT_AFTER_MESSAGES - 1)
    assert w.c.next == REJECT_AFTER_MESSAGES
    assert not w.accept(REJECT_AFTER_MESSAGES - 1)
    assert not w.accept(REJECT_AFTER_MESSAGES)
    assert w.accept(REJECT_AFTER_MESSAGES - 2)


def test_wireguard_gos_sequence():
    """replay_test.go's TestReplay (ported from the Linux kernel's), with its window. Every
    answer is wireguard-go's except step 18, exactly RW_BITS - 64 below the highest, which it
    accepts and we, like the reference ReplayWindow, refuse."""
    limit = REPLAY_WINDOW + 1
    w = _TestReplayWin()
    table = [
        (0, True), (1, True), (1, False), (9, True), (8, True), (7, True), (7, False),
        (limit, True), (limit - 1, True), (limit - 1, False), (limit - 2, True), (2, True),
        (2, False), (limit + 16, True), (3, False), (limit + 16, False), (limit * 4, True),
        (limit * 4 - (limit - 1), False),   # wireguard-go: True (the edge)
        (10, False), (limit * 4 - limit, False),
        (limit * 4 - (limit + 1), False), (limit * 4 - (limit - 2), True),
        (limit * 4 + 1 - limit, False), (0, False), (REJECT_AFTER_MESSAGES, False),
        (REJECT_AFTER_MESSAGES - 1, True), (REJECT_AFTER_MESSAGES, False),
        (REJECT_AFTER_MESSAGES - 1, False), (REJECT_AFTER_MESSAGES - 2, True),
        (REJECT_AFTER_MESSAGES + 1, False), (REJECT_AFTER_MESSAGES + 2, False),
        (REJECT_AFTER_MESSAGES - 2, False), (REJECT_AFTER_MESSAGES - 3, True), (0, False),
    ]
    for i, (counter, expected) in enumerate(table, 1):
        assert w.accept(counter) == expected, (i, counter)


def test_wireguard_gos_bulk_sequences():
    # Bulk test 1 of replay_test.go: 1..window, then 0, which is exactly the window behind:
    # wireguard-go accepts it, the reference and we refuse it.
    w = Both()
    for c in range(1, REPLAY_WINDOW + 1):
        assert w.accept(c)
    assert not w.accept(0)
    # Bulk test 3: window+1 down to 1; the last, 1, is exactly the window behind again.
    w = Both()
    for c in range(REPLAY_WINDOW + 1, 1, -1):
        assert w.accept(c)
    assert not w.accept(1)
    # Bulk test 2: 2..window+1, then 1 (the edge: wireguard-go accepts it) and 0 (beyond).
    w = Both()
    for c in range(2, REPLAY_WINDOW + 2):
        assert w.accept(c)
    assert not w.accept(1) and not w.accept(0)
    assert not w.accept(3) and w.accept(REPLAY_WINDOW + 2)
