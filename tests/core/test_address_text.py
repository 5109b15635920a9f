"""Addresses read from text (the peer API's): as ``ipaddress`` reads them, whatever the path."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conn25.core.iprange import canonical_address, parse_address

EDGES = [
    "1.2.3.4", "0.0.0.0", "255.255.255.255", "169.254.130.17", "256.1.1.1", "01.2.3.4",
    "1.2.3.04", "000.1.1.1", "1.2.3", "1.2.3.4.5", "1..3.4", "\u0661.2.3.4", "+1.2.3.4",
    " 1.2.3.4", "1.2.3.4 ", "1_0.2.3.4", "99.999.1.1", "1.2.3.4%eth0", "", "a.b.c.d",
    "2001:db8::1", "2001:DB8:0:0::1", "::ffff:1.2.3.4", "fd7a:115c:a1e0::1",
]


def expected(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check(text: str) -> None:
    want = expected(text)
    parse_address.cache_clear()
    canonical_address.cache_clear()
    if want is None:
        with pytest.raises(ValueError, match="is not an IP address"):
            parse_address(text)
        with pytest.raises(ValueError, match="is not an IP address"):
            canonical_address(text)
    else:
        got = parse_address(text)
        assert got == want and type(got) is type(want)
        assert canonical_address(text) == str(want)


@pytest.mark.parametrize("text", EDGES)
def test_edge_cases_read_as_ipaddress_reads_them(text: str) -> None:
    check(text)


@given(st.lists(st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "",
                                                                         "x", "1e2", " 1"])),
                min_size=1, max_size=5).map(".".join))
def test_dotted_texts_read_as_ipaddress_reads_them(text: str) -> None:
    check(text)
