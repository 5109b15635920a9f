"""The status document and its text table."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest
import trio
from test_registration import (
    C1,
    C2,
    GITHUB,
    LAPTOP,
    T0,
    TAG,
    FakeNode,
    FakePeers,
    client_config,
    run,
)

from conn25.core.config import App, NodeConfig
from conn25.core.connector import ConnectorTable
from conn25.core.peerapi import ConnectorTransitIPRequest, HealthResponse, TransitIPRequest
from conn25.core.wireguard import keys
from conn25.daemon.registration import Registrar
from conn25.daemon.status import domain_order, render_table, status_document

ALPHA = App("Alpha", ("alpha.example.",), (TAG,))
WIDE = App("GitHub", ("github.com.", "*.github.com.", "githubassets.com."), (TAG,))
SERVED = App("Served", ("served.example.",), ("tag:served",))


def ip(text: str):
    return ipaddress.ip_address(text)


def key_pair() -> tuple[bytes, bytes]:
    private = keys.generate_private()
    return private, keys.public_from_private(private)


class FakeOverlay:
    """``status.OverlayPeers``: this node's key pair (the private key only so tests can
    look for it in the output) and ``peers()`` as ``Overlay.peers`` gives them."""

    def __init__(self, peers: list[dict] | None = None) -> None:
        self.private_key, self.public_key = key_pair()
        self.peer_list = peers or []

    def peers(self) -> list[dict]:
        return [dict(p) for p in self.peer_list]


def overlay_peer(name: str, **fields) -> dict:
    """One entry of ``Overlay.peers()``: a fresh peer unless ``fields`` say otherwise."""
    return {
        "name": name, "publicKey": keys.encode(key_pair()[1]), "endpoint": None,
        "endpointLearned": None, "latestHandshake": None, "handshaking": False,
        "rxBytes": 0, "txBytes": 0, "staged": 0,
        "drops": dict.fromkeys(("replay", "auth", "expired", "spoofed", "no_endpoint",
                                "staged_overflow"), 0),
    } | fields


class StatusNode(FakeNode):
    """FakeNode as a ``status.StatusSource``: with an overlay."""

    def __init__(self, cfg: NodeConfig | None = None) -> None:
        super().__init__(cfg)
        self.overlay = FakeOverlay()
        self.tun_offload = "off"
        self.tun_queues = 1

    def dns_status(self) -> dict:
        return {"mode": "resolv.conf", "path": "/etc/resolv.conf", "server": "100.100.100.100"}


def client_node(apps: tuple[App, ...] = (WIDE, ALPHA)) -> StatusNode:
    node = StatusNode(client_config(apps=apps))
    peers = FakePeers()
    node.registrar = Registrar(node, post=peers.post, get=peers.get)
    node.peers = peers  # type: ignore[attr-defined]
    return node


def addresses(doc: dict, app: str, domain: str) -> list[dict]:
    [a] = [a for a in doc["client"]["apps"] if a["name"] == app]
    [d] = [d for d in a["domains"] if d["domain"] == domain]
    return d["addresses"]


def test_not_configured_is_just_that_and_the_overlay():
    """{configured: false} and the overlay: a node without apps still has peers."""
    node = client_node(apps=())
    node.overlay.peer_list = [overlay_peer(C1.name)]
    doc = status_document(node)
    assert doc == {"configured": False, "now": T0,
                   "publicKey": keys.encode(node.overlay.public_key),
                   "peers": node.overlay.peers()}
    text = render_table(doc)
    assert text.startswith("not configured")
    assert keys.encode(node.overlay.public_key) in text
    assert C1.name in text and node.overlay.peer_list[0]["publicKey"] in text


def test_apps_by_name_domains_parents_first_addresses_by_flows_then_real():
    """The order rules of the client view."""
    node = client_node()
    for domain in ["gist.github.com.", "a.b.github.com.", "githubassets.com.", "github.com.",
                   "b.github.com.", "api.github.com."]:
        node.reserve(domain, "203.0.113.50")
    node.reserve("alpha.example.", "203.0.113.60", app="Alpha")
    for real, flows in [("203.0.113.10", 0), ("203.0.113.9", 0), ("2001:db8::1", 0),
                        ("203.0.113.200", 3), ("2001:db8::2", 1)]:
        node.reserve("github.com.", real, flows)
    doc = status_document(node)
    assert [a["name"] for a in doc["client"]["apps"]] == ["Alpha", "GitHub"]
    [_, github] = doc["client"]["apps"]
    assert [d["domain"] for d in github["domains"]] == [
        "github.com.", "api.github.com.", "b.github.com.", "a.b.github.com.",
        "gist.github.com.", "githubassets.com.",
    ]
    reals = [a["real"] for a in addresses(doc, "GitHub", "github.com.")]
    # Most flows first; then by address as a number (.9 before .10), IPv4 before IPv6.
    assert reals == ["203.0.113.200", "2001:db8::2", "203.0.113.9", "203.0.113.10",
                     "203.0.113.50", "2001:db8::1"]


def test_domain_order_puts_parents_before_children():
    names = ["x.example.com.", "example.com.", "a.x.example.com.", "b.example.com.", "com."]
    assert sorted(names, key=domain_order) == [
        "com.", "example.com.", "b.example.com.", "x.example.com.", "a.x.example.com."]


def test_an_address_shows_magic_transit_real_app_domain_expiry_flows_connector():
    node = client_node()
    a = node.reserve("api.github.com.", "203.0.113.7", flows=2)
    node.assignments.attach(a.transit, C1.name)
    [entry] = addresses(status_document(node), "GitHub", "api.github.com.")
    assert entry == {
        "magic": str(a.magic), "transit": str(a.transit), "real": "203.0.113.7",
        "app": "GitHub", "domain": "api.github.com.", "expiry": T0 + 300,
        "activeFlows": 2, "connector": C1.name,
    }


def test_pools_show_in_use_and_capacity_per_family():
    node = client_node()
    node.reserve("github.com.", "203.0.113.1")
    node.reserve("github.com.", "2001:db8::1")
    node.reserve("github.com.", "2001:db8::2")
    pools = status_document(node)["client"]["pools"]
    assert pools == node.assignments.pool_usage()
    assert pools["v4Magic"]["inUse"] == 1 and pools["v6Transit"]["inUse"] == 2
    assert pools["v4Magic"]["capacity"] == 65536


def test_apps_without_assignments_and_the_chosen_connector_are_listed():
    node = client_node()
    peers = node.peers

    async def main():
        peers.health["100.64.0.2"] = HealthResponse(False, [], C1.name)
        await node.registrar.check_health()

    run(main)
    doc = status_document(node)
    [alpha, github] = doc["client"]["apps"]
    assert alpha["domains"] == [] and github["domains"] == []
    assert github["connector"] == C2.name
    assert github["candidates"] == [{"name": C1.name, "healthy": False},
                                    {"name": C2.name, "healthy": True}]
    assert doc["connectorHealth"][C1.name]["advertisesConnector"] is False


def test_the_connector_view_lists_peers_and_their_mappings():
    """Connector view: peers, their apps and transit -> destination."""
    cfg = client_config(apps=(GITHUB, SERVED), node=C1, advertise=True)
    node = StatusNode(cfg)
    node.registrar = Registrar(node)
    table = node.connector = ConnectorTable(cfg)
    # C1 carries the GitHub tag: it serves GitHub, and maps only Served as a client.
    table.note_resolution("GitHub", "github.com.", [(ip("203.0.113.5"), 600)], T0)
    table.handle_request(LAPTOP, ConnectorTransitIPRequest(
        [TransitIPRequest("169.254.128.9", "203.0.113.5", "GitHub")]), T0)
    doc = status_document(node)
    assert [a["name"] for a in doc["client"]["apps"]] == ["Served"]
    assert doc["connector"] == {
        "configured": True, "apps": ["GitHub"],
        "peers": [{"name": "laptop", "apps": ["GitHub"], "mappings": [
            {"transit": "169.254.128.9", "destination": "203.0.113.5", "app": "GitHub",
             "expires": T0 + 3600}]}],
    }
    text = render_table(doc)
    assert "connector for GitHub" in text and "169.254.128.9" in text and "in 1h00m" in text


def test_a_client_only_node_says_it_is_no_connector():
    doc = status_document(client_node())
    assert doc["connector"] == {"configured": False}
    assert doc["advertiseConnector"] is False and doc["node"] == "laptop"


def test_counters_of_the_datapath_and_the_control_plane_are_included():
    node = client_node()
    doc = status_document(node)
    assert doc["datapath"] == node.datapath.counters()
    assert doc["metrics"]["registration_acked"] == 0 and "reloads" in doc["metrics"]
    assert doc["now"] == T0


def test_the_tun_offload_mode_is_shown():
    node = client_node()
    assert status_document(node)["tunOffload"] == "off"
    node.tun_offload = "tso+uso"
    doc = status_document(node)
    assert doc["tunOffload"] == "tso+uso"
    assert "datapath (TUN offload: tso+uso)" in render_table(doc).splitlines()


def test_the_tun_queues_and_what_each_moved_are_shown():
    node = client_node()
    doc = status_document(node)
    assert doc["tunQueues"] == 1 and doc["datapathQueues"] == node.datapath.queue_counters()
    assert "QUEUE" not in render_table(doc)
    node.tun_queues = 2
    doc = status_document(node) | {"datapathQueues": [
        {"tun_rx": 5, "udp_tx": 6, "udp_rx": 7, "tun_tx": 8},
        {"tun_rx": 9, "udp_tx": 10, "udp_rx": 11, "tun_tx": 12}]}
    lines = render_table(doc).splitlines()
    assert "datapath (TUN offload: off, 2 queues)" in lines
    rows = [line.split() for line in lines[lines.index("  QUEUE  TUN RX  UDP TX  UDP RX  TUN TX"):]]
    assert rows[1:3] == [["0", "5", "6", "7", "8"], ["1", "9", "10", "11", "12"]]


def test_the_document_encodes_as_json():
    node = client_node()
    node.reserve("github.com.", "2001:db8::1", flows=1)
    doc = status_document(node)
    assert msgspec.json.decode(msgspec.json.encode(doc)) == doc


def test_the_table_lists_addresses_in_document_order_with_time_left():
    node = client_node()
    quiet = node.reserve("github.com.", "203.0.113.9")
    busy = node.reserve("github.com.", "203.0.113.10", flows=4)
    node.assignments.attach(busy.transit, C1.name)
    node.t = T0 + 30
    expired = node.reserve("api.github.com.", "203.0.113.11")
    expired.expiry = T0  # expired, still in use until reclaimed
    text = render_table(status_document(node))
    lines = text.splitlines()
    assert lines[0] == "node laptop (client)"
    quiet_row, busy_row, expired_row = (
        next(i for i, line in enumerate(lines) if str(a.magic) in line)
        for a in (quiet, busy, expired))
    assert busy_row < quiet_row < expired_row
    assert "in 4m30s" in lines[quiet_row] and "(unregistered)" in lines[quiet_row]
    assert C1.name in lines[busy_row] and " 4 " in lines[busy_row]
    assert "expired 30s ago" in lines[expired_row]
    assert "app Alpha: connector gh-connector-1" in text and "no assignments" in text
    assert "pools" in text and "datapath" in text and "control plane" in text


def test_the_table_tolerates_a_sparse_document():
    """A document from another version (fields missing) still renders."""
    assert render_table({"configured": True}).startswith("node ? (client)")


def test_status_reflects_registrations_made_by_the_registrar():
    """End to end on the fakes: a registered assignment shows its connector."""
    node = client_node()
    a = node.reserve("github.com.", "203.0.113.1")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(node.registrar.run)
            assert await node.registrar.register([a])
            nursery.cancel_scope.cancel()

    run(main)
    [entry] = addresses(status_document(node), "GitHub", "github.com.")
    assert entry["connector"] == C1.name
    assert status_document(node)["metrics"]["registration_acked"] == 1


# -- the overlay's peers ------------------------------------------------------------------


MiB, KiB = 1024 * 1024, 1024


def peered_node() -> StatusNode:
    """A client with three peers: one busy and roaming, one configured and never reached,
    one without an endpoint."""
    node = client_node()
    node.overlay.peer_list = [
        overlay_peer(C2.name, endpoint="192.0.2.7:41641"),
        overlay_peer(C1.name, endpoint="198.51.100.20:5555", endpointLearned=T0 - 95,
                     latestHandshake=T0 - 12, handshaking=True,
                     rxBytes=int(1.2 * MiB), txBytes=340 * KiB, staged=2,
                     drops={"replay": 3, "auth": 0, "spoofed": 1}),
        overlay_peer("phone"),
    ]
    return node


def test_the_document_has_this_nodes_public_key_and_the_peers_by_name():
    node = peered_node()
    doc = status_document(node)
    assert doc["publicKey"] == keys.encode(node.overlay.public_key)
    assert [p["name"] for p in doc["peers"]] == [C1.name, C2.name, "phone"]
    by_name = {p["name"]: p for p in node.overlay.peers()}
    assert doc["peers"] == [by_name[p["name"]] for p in doc["peers"]]
    [c1, _, _] = doc["peers"]
    assert c1["endpointLearned"] == T0 - 95 and c1["latestHandshake"] == T0 - 12
    assert c1["drops"] == {"replay": 3, "auth": 0, "spoofed": 1}


def test_only_the_known_peer_fields_reach_the_document():
    """Whatever else the overlay might put in a peer (key material above all) is left out."""
    node = client_node()
    private = keys.encode(node.overlay.private_key)
    node.overlay.peer_list = [overlay_peer(C1.name, privateKey=private, presharedKey=private)]
    [peer] = status_document(node)["peers"]
    assert set(peer) == {"name", "publicKey", "endpoint", "endpointLearned",
                         "latestHandshake", "handshaking", "rxBytes", "txBytes", "staged",
                         "drops"}


def test_the_private_key_is_nowhere_in_the_json_or_the_table():
    for node in (peered_node(), client_node(apps=())):
        private = keys.encode(node.overlay.private_key)
        node.overlay.peer_list.append(overlay_peer("leaky", privateKey=private))
        doc = status_document(node)
        public = keys.encode(node.overlay.public_key)
        json_text = msgspec.json.encode(doc).decode()
        table = render_table(doc)
        # The public key is there: the check for the private one looks in the right place.
        assert public in json_text and public in table
        assert private not in json_text and private not in table
        # Nor its raw bytes in another spelling.
        assert node.overlay.private_key.hex() not in json_text + table


def test_the_table_has_a_line_per_peer_like_wg_show():
    node = peered_node()
    text = render_table(status_document(node))
    lines = text.splitlines()
    header = lines.index(f"peers (this node's public key: {keys.encode(node.overlay.public_key)})")
    assert "PUBLIC KEY" in lines[header + 1] and "LATEST HANDSHAKE" in lines[header + 1]
    c1, c2, phone = lines[header + 2:header + 5]
    assert c1.split()[0] == C1.name and c2.split()[0] == C2.name and phone.split()[0] == "phone"
    for line, peer in zip((c1, c2, phone), status_document(node)["peers"], strict=True):
        assert peer["publicKey"] in line
    assert "198.51.100.20:5555 (learned 1m35s ago)" in c1
    assert "12s ago" in c1
    assert "1.2 MiB received, 340 KiB sent" in c1
    # Drops by name, zeros (auth) left out; then the handshake under way.
    assert c1.endswith("340 KiB sent  drops: replay 3, spoofed 1; handshaking")
    assert "192.0.2.7:41641 (configured)" in c2 and " never " in c2
    assert c2.endswith(" 0 B received, 0 B sent")  # no drops, not handshaking
    assert "(none)" in phone
    # Between the connector/pools sections and the counters.
    assert lines.index("pools") < header < lines.index("datapath (TUN offload: off)")


@pytest.mark.parametrize(("dns", "line"), [
    ({"mode": "resolv.conf", "path": "/etc/resolv.conf", "server": "100.100.100.100"},
     "dns: /etc/resolv.conf points at 100.100.100.100 (--accept-dns)"),
    ({"mode": "systemd-resolved", "server": "100.100.100.100"},
     "dns: systemd-resolved sends app names to 100.100.100.100 (--accept-dns)"),
    ({"mode": "off"}, "dns: the system's DNS is left alone (--accept-dns=false)"),
])
def test_the_dns_mode_is_in_the_document_and_under_the_node_line(dns, line):
    node = client_node()
    node.dns_status = lambda: dns  # type: ignore[method-assign]
    doc = status_document(node)
    assert doc["dns"] == dns
    assert render_table(doc).splitlines()[1] == line


def test_a_node_without_peers_says_so():
    text = render_table(status_document(client_node()))
    assert "peers (this node's public key: " in text and "  no peers" in text


def test_a_handshake_a_little_in_the_future_is_now():
    """The overlay and ``now`` read the wall clock at different moments."""
    node = client_node()
    node.overlay.peer_list = [overlay_peer(C1.name, latestHandshake=T0 + 0.4)]
    [row] = [line for line in render_table(status_document(node)).splitlines()
             if line.startswith(f"  {C1.name} ")]
    assert " 0s ago " in row


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (10 * KiB, "10 KiB"),
    (340 * KiB, "340 KiB"), (int(1.2 * MiB), "1.2 MiB"), (5 * 1024**3, "5.0 GiB"),
    (2000 * 1024**5, "2000 PiB"),
])
def test_transfer_is_in_binary_units(n, text):
    node = client_node()
    node.overlay.peer_list = [overlay_peer(C1.name, rxBytes=n)]
    assert f" {text} received, 0 B sent" in render_table(status_document(node))
