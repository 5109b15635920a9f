"""IP addresses, inclusive ranges and range sets (the netipx model).

Pools and policies are written as ``"a-b"`` ranges, CIDR prefixes or single
addresses; everything is kept as integer intervals per address family so
that overlap checks, membership and pool walks are cheap and exact.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import msgspec

_T = TypeVar("_T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=1024)  # a peer API item's addresses are read several times over
def parse_address(text: str) -> IPAddress:
    """Parse one IPv4 or IPv6 address; ValueError names the bad text."""
    value = _dotted_quad(text)
    if value is not None:
        return ipaddress.IPv4Address(value)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


@functools.lru_cache(maxsize=1024)
def canonical_address(text: str) -> str:
    """The canonical text of one IPv4 or IPv6 address; ValueError names the bad text."""
    if _DOTTED_QUAD.fullmatch(text) is not None:
        return text  # canonical already: four decimal octets without leading zeros
    return str(parse_address(text))


def _dotted_quad(text: str) -> int | None:
    """The value of ``text`` when it is an IPv4 address in canonical form, else None
    (``ipaddress`` then decides): each fresh name's transit IPs are read as text on
    both ends, and ``ipaddress`` takes several times as long for each."""
    if _DOTTED_QUAD.fullmatch(text) is None:
        return None
    return int.from_bytes(bytes(map(int, text.split("."))), "big")


# Four decimal octets of 0-255 without leading zeros, as ``str(IPv4Address)`` writes them.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def make_address(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


class IPRange(msgspec.Struct, frozen=True, order=True):
    """An inclusive range of addresses of one family, ``first <= last``."""

    version: int
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> IPRange:
        """Parse ``"a-b"``, ``"a/n"`` or ``"a"``; ValueError says what is wrong."""
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not a string range")
        text = text.strip()
        if "-" in text:
            lo_text, _, hi_text = text.partition("-")
            lo, hi = parse_address(lo_text.strip()), parse_address(hi_text.strip())
            if lo.version != hi.version:
                raise ValueError(f"range {text!r} mixes IPv4 and IPv6")
            if int(lo) > int(hi):
                raise ValueError(f"range {text!r} ends before it starts")
            return cls(lo.version, int(lo), int(hi))
        if "/" in text:
            try:
                net = ipaddress.ip_network(text, strict=True)
            except ValueError as e:
                raise ValueError(f"{text!r} is not a valid prefix ({e})") from None
            return cls(net.version, int(net.network_address), int(net.broadcast_address))
        addr = parse_address(text)
        return cls(addr.version, int(addr), int(addr))

    @classmethod
    def single(cls, addr: IPAddress) -> IPRange:
        return cls(addr.version, int(addr), int(addr))

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, addr: object) -> bool:
        if not isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return addr.version == self.version and self.first <= int(addr) <= self.last

    def overlaps(self, other: IPRange) -> bool:
        return (
            self.version == other.version
            and self.first <= other.last
            and other.first <= self.last
        )

    def prefixes(self) -> list[IPNetwork]:
        """The smallest list of CIDR prefixes covering exactly this range."""
        lo = make_address(self.version, self.first)
        hi = make_address(self.version, self.last)
        return list(ipaddress.summarize_address_range(lo, hi))

    def __str__(self) -> str:
        lo = make_address(self.version, self.first)
        if self.first == self.last:
            return str(lo)
        return f"{lo}-{make_address(self.version, self.last)}"


class IPSet(msgspec.Struct, frozen=True):
    """A union of ranges, normalised: sorted, merged, one family per range.

    Build it with :meth:`of`; two sets with the same addresses compare equal.
    """

    ranges: tuple[IPRange, ...] = ()

    @classmethod
    def of(cls, ranges: Iterable[IPRange]) -> IPSet:
        merged: list[IPRange] = []
        for r in sorted(ranges):
            if merged and merged[-1].version == r.version and r.first <= merged[-1].last + 1:
                last = merged[-1]
                merged[-1] = IPRange(r.version, last.first, max(last.last, r.last))
            else:
                merged.append(r)
        return cls(tuple(merged))

    def __contains__(self, addr: object) -> bool:
        return any(addr in r for r in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __iter__(self) -> Iterator[IPRange]:
        return iter(self.ranges)

    def family(self, version: int) -> IPSet:
        return IPSet(tuple(r for r in self.ranges if r.version == version))

    def overlapping(self, other: IPSet) -> list[tuple[IPRange, IPRange]]:
        return [(a, b) for a in self.ranges for b in other.ranges if a.overlaps(b)]

    def size(self) -> int:
        return sum(r.size for r in self.ranges)

    def prefixes(self) -> list[IPNetwork]:
        return [p for r in self.ranges for p in r.prefixes()]

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.ranges)


def parse_list(text: str, option: str, what: str, parse: Callable[[str], _T]) -> list[_T]:
    """The items of a comma-separated option value, each through ``parse``; ValueError
    names the option and the empty or bad item."""
    out: list[_T] = []
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        if not item:
            raise ValueError(f"{option} {text!r}: {what} {i + 1} is empty")
        try:
            out.append(parse(item))
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None
    return out
