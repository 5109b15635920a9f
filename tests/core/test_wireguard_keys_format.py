"""WireGuard key helpers: generation, the public key, and the base64 text form."""

from __future__ import annotations

import base64

import pytest

from conn25.core.wireguard import keys as wgkeys

# RFC 7748 section 6.1: Alice's private key and the public key X25519 gives for it.
RFC_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def test_public_key_matches_the_rfc_test_vector():
    assert wgkeys.public_from_private(RFC_PRIVATE) == RFC_PUBLIC


def test_generated_keys_are_clamped_random_and_32_bytes():
    keys = {wgkeys.generate_private() for _ in range(64)}
    assert len(keys) == 64
    for k in keys:
        assert len(k) == 32
        assert k[0] & 7 == 0
        assert k[31] & 0x80 == 0 and k[31] & 0x40 == 0x40


def test_clamping_does_not_change_the_public_key():
    """X25519 clamps the scalar itself, so a key and its clamped form are one key pair."""
    raw = bytes(range(224, 256))
    assert wgkeys.public_from_private(raw) == wgkeys.public_from_private(wgkeys._clamp(raw))


def test_encode_and_decode_round_trip():
    key = wgkeys.generate_private()
    text = wgkeys.encode(key)
    assert len(text) == 44 and text.endswith("=")
    assert wgkeys.decode(text) == key


@pytest.mark.parametrize(("text", "message"), [
    ("", "0 characters"),
    ("A" * 43, "43 characters"),
    ("A" * 43 + "==", "45 characters"),
    ("A" * 42 + "==", "ends in exactly one"),
    ("A" * 44, "ends in exactly one"),
    ("A" * 42 + "-=", "not base64"),
    ("A" * 42 + "_=", "not base64"),
    ("A" * 20 + "=" + "A" * 22 + "=", "not base64"),
    ("A" * 21 + " " + "A" * 21 + "=", "not base64"),
    ("A" * 42 + "é=", "not base64"),
    ("A" * 42 + "B=", "canonical"),  # "B" sets a bit beyond the 256th
])
def test_malformed_text_is_rejected_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        wgkeys.decode(text)


def test_errors_never_contain_the_text():
    """A private key with one character too many or one changed must not be echoed."""
    good = wgkeys.encode(wgkeys.generate_private())
    for bad in (good + "A", good[:-1], good[:-2] + "!=", good[:10] + "=" + good[11:]):
        with pytest.raises(ValueError) as info:
            wgkeys.decode(bad)
        assert good[:20] not in str(info.value)
        assert bad[:20] not in str(info.value)


@pytest.mark.parametrize("n", [0, 31, 33])
def test_keys_of_the_wrong_size_are_rejected(n):
    with pytest.raises(ValueError, match=f"got {n}"):
        wgkeys.public_from_private(b"\x01" * n)
    with pytest.raises(ValueError, match=f"got {n}"):
        wgkeys.encode(b"\x01" * n)


def test_encoding_is_standard_base64():
    key = bytes(range(32))
    assert wgkeys.encode(key) == base64.b64encode(key).decode()


def test_keys_round_trip_through_base64():
    private = wgkeys.generate_private()
    text = wgkeys.encode(private)
    assert len(text) == 44 and text.endswith("=")
    assert wgkeys.decode(text) == private
    with pytest.raises(ValueError):  # as strict as wg: readers of key files strip the newline
        wgkeys.decode(text + "\n")
    assert wgkeys.public_from_private(private) != private
    assert private[0] & 7 == 0 and private[31] & 0xC0 == 0x40  # clamped, as `wg genkey`


@pytest.mark.parametrize("text", [
    "", "abc", base64.b64encode(bytes(31)).decode(), base64.b64encode(bytes(33)).decode(),
    "!" * 43 + "=", base64.urlsafe_b64encode(b"\xff" * 32).decode(),
])
def test_malformed_keys_are_refused_without_echoing_them(text):
    with pytest.raises(ValueError) as e:
        wgkeys.decode(text)
    if len(text) > 8:
        assert text not in str(e.value)


def test_low_order_points_are_refused():
    with pytest.raises(ValueError):
        wgkeys.dh(RFC_PRIVATE, bytes(32))
