"""A handshake captured from a real WireGuard peer (Debian's wireguard-go) decodes: the
initiation authenticates, our response is what wireguard-go accepted (it answered it with
transport data), and its first transport message is its ping."""

from __future__ import annotations

import json
from pathlib import Path

from scapy.layers.inet import ICMP, IP

from conn25.core.wireguard import keys
from conn25.core.wireguard.device import Device
from conn25.core.wireguard.handshake import consume_initiation
from conn25.core.wireguard.messages import Initiation
from conn25.core.wireguard.noise import tai64n
from conn25.core.wireguard.peer import Randomness

CAPTURE = json.loads((Path(__file__).parents[1] / "data" / "wireguard_go_handshake.json")
                     .read_text())


def test_a_captured_wireguard_go_handshake_decodes():
    c = CAPTURE
    ours = keys.decode(c["our_private"])
    rand = Randomness(private_key=lambda: keys.decode(c["our_ephemeral_private"]),
                      index=lambda: c["our_index"])
    device = Device(ours, rand)
    theirs = keys.public_from_private(keys.decode(c["wireguard_go_private"]))
    peer = device.add_peer(theirs)

    init = bytes.fromhex(c["initiation"])
    got = device.receive(init, b"", 1000.0)
    assert got.peer is peer and got.keypair is not None
    assert got.keypair.remote_index == Initiation.decode(init).sender
    assert got.reply == bytes.fromhex(c["our_response"])
    # Its TAI64N timestamp is later than this test, in the same format as ours.
    stamp = consume_initiation(device.identity, Initiation.decode(init)).timestamp
    assert tai64n(1_764_000_000) < stamp < tai64n(1_900_000_000)

    payload = device.receive(bytes.fromhex(c["transport"]), b"", 1000.0).payload
    assert payload is not None
    ping = IP(payload[: int.from_bytes(payload[2:4], "big")])
    assert (ping.src, ping.dst, ping[ICMP].type) == ("100.64.0.2", "100.64.0.1", 8)
    assert bytes(ping[ICMP].payload).endswith(b"\xc0\x25" * 4)  # ping -p c025
