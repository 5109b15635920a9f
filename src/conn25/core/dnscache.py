"""The client's cache of mapped answers (sans-IO).

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

__all__ = ["AnswerCache", "ttl_offsets"]

DEFAULT_ENTRIES = 4096
_RD = 0x01  # in the high byte of the flags


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


class AnswerCache:
    """Mapped answers by question, each until its smallest TTL runs out.

    At most ``entries`` are kept; storing beyond that drops the oldest stored.
    """

    def __init__(self, entries: int = DEFAULT_ENTRIES) -> None:
        if entries < 1:
            raise ValueError("an answer cache needs room for at least one entry")
        self._limit = entries
        self._entries: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

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
        ttls = [struct.unpack_from("!I", answer, o)[0] & 0x7FFFFFFF for o in offsets]
        lifetime = min(ttls)
        if lifetime <= 0:
            return False
        self._entries.pop(key, None)
        while len(self._entries) >= self._limit:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = _Entry(bytearray(answer), offsets, ttls, now, now + lifetime, 0,
                                    list(assignments))
        return True

    def get(self, query: Query, now: float) -> tuple[bytes, list[Assignment]] | None:
        """The cached answer to ``query`` (its id and RD bit, TTLs counted down) and the
        assignments it names; None on a miss or an expired entry (which is dropped)."""
        key = query.key
        if key is None:
            return None
        e = self._entries.get(key)
        if e is None:
            return None
        if now >= e.expires or now < e.stored:  # expired, or the clock went back
            del self._entries[key]
            return None
        aged = int(now - e.stored)
        if aged != e.aged:
            for offset, ttl in zip(e.offsets, e.ttls, strict=True):
                struct.pack_into("!I", e.wire, offset, ttl - aged)
            e.aged = aged
        out = bytearray(e.wire)
        out[0:2] = query.id.to_bytes(2, "big")
        out[2] = (out[2] & ~_RD) | ((query.flags >> 8) & _RD)
        return bytes(out), e.assignments

    def drop(self, query: Query) -> None:
        if query.key is not None:
            self._entries.pop(query.key, None)
