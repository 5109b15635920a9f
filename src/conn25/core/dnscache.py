"""The client's DNS caches (sans-IO): mapped answers of app names, and forwarded answers of
every other name.

Without it every app-domain query costs a resolution at a connector over the
peer API; with it a repeated question is answered locally until the upstream
TTL runs out, like any caching resolver. An entry is stored only once the
connector acknowledged its mappings, and the caller checks on every hit
that the entry's assignments are still the live, registered ones.

An entry is the mapped answer as sent, keyed by the exact bytes of the
question (name in the asker's case, type, class): the answer echoes the
question, so a 0x20-randomised name gets its own entry rather than a
mismatched echo. On a hit only the id, the RD bit and the TTLs change; the
TTLs count down from the upstream ones, as RFC 1035 §4.1.3 expects of a cache.

Forwarded answers (:class:`ForwardCache`) follow the same rules, and negative
answers are kept too, for as long as RFC 2308 §5 says: the smaller of the SOA
record's TTL and its MINIMUM field (an NXDOMAIN or NODATA answer without a SOA
is not kept). That cache is bounded in entries and in bytes.

Only plain queries (opcode QUERY, one question, no answer or authority
section) are keyed (:attr:`conn25.core.dnsquery.Query.key`); anything else goes
the uncached way, which validates it. The cache takes the query as
:func:`conn25.core.dnsquery.parse` read it, so a query is parsed once.

May not touch: sockets, clocks, logging, trio.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .assignments import Assignment
from .dnsquery import HEADER, Query, read_name

__all__ = ["AnswerCache", "ForwardCache", "ttl_offsets"]

DEFAULT_ENTRIES = 4096
FORWARD_ENTRIES = 10_000
FORWARD_BYTES = 4 << 20
_RD = 0x01  # in the high byte of the flags
_TC = 0x02  # in the high byte of the flags
_NXDOMAIN = 3
_SOA = 6


def ttl_offsets(wire: bytes) -> list[int]:
    """Offsets of the TTL field of every resource record in ``wire``; ValueError if malformed.

    Names are stepped over with the one name reader of the DNS path
    (:func:`conn25.core.dnsquery.read_name`), whose DNSMapError is a ValueError.
    """
    if len(wire) < HEADER:
        raise ValueError("shorter than a DNS header")
    qd, an, ns, ar = struct.unpack_from("!HHHH", wire, 4)
    i = HEADER
    for _ in range(qd):
        i = read_name(wire, i)[1] + 4
    out = []
    for _ in range(an + ns + ar):
        i = read_name(wire, i)[1]
        if i + 10 > len(wire):
            raise ValueError("record header runs past the message")
        out.append(i + 4)
        i += 10 + struct.unpack_from("!H", wire, i + 8)[0]
    if i > len(wire):
        raise ValueError("record data runs past the message")
    return out


@dataclass(slots=True)
class _Entry:
    wire: bytearray  # the answer as last sent, TTLs as of ``aged`` seconds after ``stored``
    offsets: list[int]
    ttls: list[int]  # as stored
    stored: float
    expires: float
    aged: int
    assignments: list[Assignment]


class _TTLStore:
    """Answers by question key, each until its lifetime runs out, TTLs counted down on the way
    out; at most ``entries`` of them and ``max_bytes`` of answers (the oldest stored go)."""

    def __init__(self, entries: int, max_bytes: int | None = None) -> None:
        if entries < 1:
            raise ValueError("an answer cache needs room for at least one entry")
        self._limit = entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def held_bytes(self) -> int:
        """Bytes of the answers held."""
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def store(self, key: bytes, answer: bytes, offsets: list[int], lifetime: int,
              assignments: Sequence[Assignment], now: float) -> bool:
        if lifetime <= 0 or (self._max_bytes is not None and len(answer) > self._max_bytes):
            return False
        self.drop(key)
        while self._entries and (len(self._entries) >= self._limit or (
                self._max_bytes is not None and self._bytes + len(answer) > self._max_bytes)):
            self.drop(next(iter(self._entries)))
        ttls = [struct.unpack_from("!I", answer, o)[0] & 0x7FFFFFFF for o in offsets]
        self._entries[key] = _Entry(bytearray(answer), offsets, ttls, now, now + lifetime, 0,
                                    list(assignments))
        self._bytes += len(answer)
        return True

    def get(self, query: Query, now: float) -> tuple[bytes, list[Assignment]] | None:
        key = query.key
        if key is None:
            return None
        e = self._entries.get(key)
        if e is None:
            return None
        if now >= e.expires or now < e.stored:  # expired, or the clock went back
            self.drop(key)
            return None
        aged = int(now - e.stored)
        if aged != e.aged:
            for offset, ttl in zip(e.offsets, e.ttls, strict=True):
                struct.pack_into("!I", e.wire, offset, max(ttl - aged, 0))
            e.aged = aged
        out = bytearray(e.wire)
        out[0:2] = query.id.to_bytes(2, "big")
        out[2] = (out[2] & ~_RD) | ((query.flags >> 8) & _RD)
        return bytes(out), e.assignments

    def drop(self, key: bytes) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self._bytes -= len(e.wire)


class AnswerCache:
    """Mapped answers by question, each until its smallest TTL runs out.

    At most ``entries`` are kept; storing beyond that drops the oldest stored.
    """

    def __init__(self, entries: int = DEFAULT_ENTRIES) -> None:
        self._store = _TTLStore(entries)

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def put(self, query: Query, answer: bytes, assignments: Sequence[Assignment],
            now: float) -> bool:
        """Keep ``answer`` to ``query``; False (nothing kept) when the query has no key, the
        answer has no answer record, a TTL of zero, or does not parse."""
        key = query.key
        if key is None:
            return False
        try:
            offsets = ttl_offsets(answer)
        except ValueError:
            return False
        if not struct.unpack_from("!H", answer, 6)[0]:  # negative answers are not cached
            return False
        lifetime = min(struct.unpack_from("!I", answer, o)[0] & 0x7FFFFFFF for o in offsets)
        return self._store.store(key, answer, offsets, lifetime, assignments, now)

    def get(self, query: Query, now: float) -> tuple[bytes, list[Assignment]] | None:
        """The cached answer to ``query`` (its id and RD bit, TTLs counted down) and the
        assignments it names; None on a miss or an expired entry (which is dropped)."""
        return self._store.get(query, now)

    def drop(self, query: Query) -> None:
        if query.key is not None:
            self._store.drop(query.key)


class ForwardCache:
    """Forwarded answers by question: positive ones until their smallest TTL runs out,
    negative ones (NXDOMAIN, NODATA) for the SOA's negative TTL (RFC 2308 §5). Truncated
    answers and errors other than NXDOMAIN are not kept. At most ``entries`` answers and
    ``max_bytes`` bytes of them; the oldest stored go first."""

    def __init__(self, entries: int = FORWARD_ENTRIES, max_bytes: int = FORWARD_BYTES) -> None:
        self._store = _TTLStore(entries, max_bytes)

    def __len__(self) -> int:
        return len(self._store)

    @property
    def held_bytes(self) -> int:
        """Bytes of the answers held."""
        return self._store.held_bytes

    def clear(self) -> None:
        self._store.clear()

    def put(self, query: Query, answer: bytes, now: float) -> bool:
        """Keep ``answer`` to ``query``; False (nothing kept) when it may not be cached."""
        key = query.key
        if key is None or len(answer) < HEADER or answer[2] & _TC:
            return False
        rcode = answer[3] & 0x0F
        if rcode not in (0, _NXDOMAIN):
            return False
        try:
            offsets = ttl_offsets(answer)
        except ValueError:
            return False
        ancount = struct.unpack_from("!H", answer, 6)[0]
        if rcode == 0 and ancount:
            lifetime = min((struct.unpack_from("!I", answer, o)[0] & 0x7FFFFFFF
                            for o in offsets[:ancount]), default=0)
        else:
            lifetime = _negative_ttl(answer, offsets, ancount)
        return self._store.store(key, answer, offsets, lifetime, (), now)

    def get(self, query: Query, now: float) -> bytes | None:
        """The cached answer to ``query`` (its id and RD bit, TTLs counted down), or None."""
        hit = self._store.get(query, now)
        return None if hit is None else hit[0]


def _negative_ttl(answer: bytes, offsets: list[int], ancount: int) -> int:
    """RFC 2308 §5: the smaller of the authority SOA's TTL and its MINIMUM; 0 without one."""
    ns = struct.unpack_from("!H", answer, 8)[0]
    for o in offsets[ancount:ancount + ns]:
        rtype = struct.unpack_from("!H", answer, o - 4)[0]
        if rtype != _SOA:
            continue
        rdlen = struct.unpack_from("!H", answer, o + 4)[0]
        end = o + 6 + rdlen
        if rdlen < 22 or end > len(answer):
            return 0
        minimum = struct.unpack_from("!I", answer, end - 4)[0]
        ttl = struct.unpack_from("!I", answer, o)[0] & 0x7FFFFFFF
        return min(ttl, minimum & 0x7FFFFFFF)
    return 0
