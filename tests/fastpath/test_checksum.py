"""The compiled checksum primitives against an independent pure-Python reference."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conn25.fastpath import checksum_replace, internet_checksum, ones_complement_sum


def ref_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071, written out the slow obvious way."""
    if len(data) % 2:
        data += b"\0"
    s = initial
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ref_checksum(data: bytes, initial: int = 0) -> int:
    return ~ref_sum(data, initial) & 0xFFFF


def test_rfc1071_example_ipv4_header():
    # A zeroed checksum field; 0xB861 is the value of the worked example on Wikipedia.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(hdr) == 0xB861
    filled = hdr[:10] + (0xB861).to_bytes(2, "big") + hdr[12:]
    assert internet_checksum(filled) == 0  # a correct header sums to 0xFFFF


def test_empty_and_odd_lengths():
    assert internet_checksum(b"") == 0xFFFF
    assert ones_complement_sum(b"\x01") == 0x0100
    assert internet_checksum(b"\x12\x34\x56") == ref_checksum(b"\x12\x34\x56")


@settings(max_examples=300)
@given(st.binary(max_size=1600), st.integers(0, 0xFFFFFF))
def test_full_checksum_matches_reference(data, initial):
    assert ones_complement_sum(data, initial) == ref_sum(data, initial)
    assert internet_checksum(data, initial) == ref_checksum(data, initial)


@settings(max_examples=300)
@given(st.binary(min_size=40, max_size=200).map(lambda b: b[: len(b) & ~1]),
       st.sampled_from([2, 4, 16]), st.data())
def test_incremental_update_equals_recomputation(packet, width, data):
    """RFC 1624: replacing a field updates the checksum to exactly the full recomputation."""
    at = data.draw(st.integers(0, (len(packet) - width) // 2)) * 2
    new_field = data.draw(st.binary(min_size=width, max_size=width))
    old_sum = internet_checksum(packet)
    changed = packet[:at] + new_field + packet[at + width:]
    updated = checksum_replace(old_sum, packet[at:at + width], new_field)
    # 0x0000 and 0xFFFF are the same value in ones' complement; compare as sums.
    assert ref_sum(updated.to_bytes(2, "big")) % 0xFFFF == internet_checksum(changed) % 0xFFFF


def test_replace_rejects_bad_widths():
    with pytest.raises(ValueError, match="2, 4 or 16"):
        checksum_replace(0, b"\x01\x02\x03", b"\x01\x02\x03")
    with pytest.raises(ValueError):
        checksum_replace(0, b"\x01\x02\x03\x04", b"\x01\x02")
