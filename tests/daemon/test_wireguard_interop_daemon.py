"""A stock WireGuard peer as a member of the tailnet: wireguard-go against a running conn25d.

The testbed (conn25.lab.testbed) builds two node namespaces behind its "internet":
"alpha" runs the real `conn25d up`; "wgpeer" runs no conn25d but wireguard-go
(conn25.lab.wggo), configured only with `wg set` and `ip`, from what the tailnet file
says: its own key pair (the private key in a 0600 file), alpha's public key, overlay
addresses and endpoint. The tailnet file lists wgpeer like any node (publicKey,
addresses, endpoint). Every wait has a deadline; every process is ours and stopped by PID.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conn25.core.config import Member
from conn25.core.wireguard import keys
from conn25.daemon.tailnetfile import load_file
from conn25.lab.netns import terminate, wait_for
from conn25.lab.testbed import NodeSpec, Testbed
from conn25.lab.wggo import WireguardGo, wireguard_missing

pytestmark = pytest.mark.root

NODES = (NodeSpec("alpha", 1, user="alice@example.com"),
         NodeSpec("wgpeer", 2, user="bob@example.com"))


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    if (why := wireguard_missing()) is not None:
        pytest.fail(why)
    with Testbed.serving(tmp_path_factory.mktemp("wgbed"), ("alpha",), nodes=NODES) as tb:
        yield tb


def member(bed: Testbed, name: str) -> Member:
    found = load_file(bed.tailnet_path).node(name)
    assert found is not None, name
    return found


def hostport(endpoint: tuple[str, int]) -> str:
    return "{}:{}".format(*endpoint)


def addresses(m: Member, plen: bool = True) -> list[str]:
    return [f"{a}/{a.max_prefixlen}" if plen else str(a) for a in m.addresses]


WgFactory = Callable[..., WireguardGo]


@pytest.fixture
def wireguard(bed: Testbed, tmp_path: Path) -> Iterator[WgFactory]:
    """A fresh conn25d on alpha (no session left from another test) and a factory of
    fresh wireguard-go devices in wgpeer, each configured from the tailnet file; with
    `endpoint=False` the device is not told where alpha is, so only alpha can start a
    handshake. Devices are stopped at the end of the test."""
    bed.stop("alpha")
    bed.start("alpha")
    made: list[WireguardGo] = []
    serial = itertools.count()

    def make(*, endpoint: bool = True) -> WireguardGo:
        # Only one device at a time holds wgpeer's port and addresses.
        while made:
            made.pop().close()
        me, alpha = member(bed, "wgpeer"), member(bed, "alpha")
        assert me.endpoint is not None and alpha.endpoint is not None
        wg = WireguardGo(bed.ns["wgpeer"], tmp_path / f"wireguard-go-{next(serial)}.log",
                         bed.private_key_path("wgpeer"), bed.specs["wgpeer"].private_key)
        made.append(wg)
        # The key file holds the private key of the tailnet file's publicKey.
        assert wg.show("public-key") == [[keys.encode(me.public_key)]]
        wg.set("listen-port", str(me.endpoint[1]),
               "peer", keys.encode(alpha.public_key),
               "allowed-ips", ",".join(addresses(alpha)),
               *(("endpoint", hostport(alpha.endpoint)) if endpoint else ()))
        wg.up(addresses(me)[0], *addresses(alpha))
        for extra in addresses(me)[1:]:
            bed.run("wgpeer", "ip", "addr", "add", extra, "dev", wg.ifname, check=True)
        return wg

    try:
        yield make
    finally:
        for wg in made:
            wg.close()
        # The devices' logs, for the report of a failed test.
        for log in sorted(tmp_path.glob("wireguard-go-*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


def metric(bed: Testbed, node: str, name: str) -> int:
    doc = bed.status(node)
    assert doc is not None
    return int(doc["metrics"].get(name, 0))


def ping(bed: Testbed, node: str, target: str, count: int = 1, wait: int = 10) -> None:
    r = bed.run(node, "ping", "-n", "-c", str(count), "-W", str(wait), target,
                timeout=count * wait + 10)
    assert r.returncode == 0, f"ping {target} from {node}: {r.stdout}{r.stderr}"


def wg_latest_handshake(wg: WireguardGo) -> int:
    """Unix time of wireguard-go's latest handshake with its one peer (0: none)."""
    rows = wg.show("latest-handshakes")
    assert len(rows) == 1, rows
    return int(rows[0][1])


def wg_transfer(wg: WireguardGo) -> tuple[int, int]:
    rows = wg.show("transfer")
    assert len(rows) == 1, rows
    return int(rows[0][1]), int(rows[0][2])


def test_conn25d_initiates_when_it_has_a_packet_for_the_wireguard_peer(bed, wireguard):
    """wireguard-go is not told alpha's endpoint, so it cannot start a handshake: alpha's
    ping makes alpha initiate, the staged ping goes once the session is up, and
    wireguard-go learns alpha's endpoint from the authenticated initiation."""
    wg = wireguard(endpoint=False)
    alpha, me = member(bed, "alpha"), member(bed, "wgpeer")
    assert wg.show("endpoints") == [[keys.encode(alpha.public_key), "(none)"]]
    ping(bed, "alpha", str(me.address(4)))
    assert metric(bed, "alpha", "wireguard_initiations") >= 1
    assert metric(bed, "alpha", "wireguard_responses") == 0
    assert alpha.endpoint is not None
    assert wg.show("endpoints") == [[keys.encode(alpha.public_key), hostport(alpha.endpoint)]]
    assert wg_latest_handshake(wg) > 0
    log = wg.log_text()
    assert "Received handshake initiation" in log and "Sending handshake initiation" not in log
    st = bed.peer_status("alpha", "wgpeer")
    assert st["latestHandshake"] is not None and st["publicKey"] == keys.encode(me.public_key)


def test_wireguard_go_initiates_with_its_first_packet(bed, wireguard):
    """A fresh wireguard-go device whose first packet is a ping to alpha: it initiates,
    alpha answers (as responder only), learns where wgpeer is and answers the ping."""
    wg = wireguard()
    alpha = member(bed, "alpha")
    ping(bed, "wgpeer", str(alpha.address(4)))
    assert "Sending handshake initiation" in wg.log_text()
    assert metric(bed, "alpha", "wireguard_responses") >= 1
    assert metric(bed, "alpha", "wireguard_initiations") == 0
    # One handshake: its first data was not lost to a keypair not yet installed (which
    # made alpha start a second handshake, and lost the ping).
    assert metric(bed, "alpha", "wireguard_handshakes_completed") == 1
    st = bed.peer_status("alpha", "wgpeer")
    assert st["latestHandshake"] is not None
    # The endpoint is where the initiation came from, which alpha learnt.
    assert st["endpointLearned"] is not None and st["endpoint"] is not None
    assert wg_latest_handshake(wg) > 0


def test_ping_both_ways_and_iperf3_through_the_tunnel(bed, wireguard):
    """Pings both ways (IPv4, and IPv6 from alpha), then a 5 s TCP iperf3 run from alpha
    to wgpeer through the tunnel: data moves, and both sides count it."""
    wg = wireguard()
    alpha, me = member(bed, "alpha"), member(bed, "wgpeer")
    ping(bed, "alpha", str(me.address(4)))
    ping(bed, "wgpeer", str(alpha.address(4)))
    ping(bed, "alpha", str(me.address(6)))

    server = bed.ns["wgpeer"].popen("iperf3", "-s", "-1", "-B", str(me.address(4)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client: subprocess.Popen | None = None
    try:
        wait_for(lambda: server.poll() is not None or
                 f"{me.address(4)}:5201 " in bed.run("wgpeer", "ss", "-Hltn").stdout, 10,
                 "the iperf3 server in wgpeer")
        assert server.poll() is None, f"iperf3 -s exited with {server.returncode}"
        before = bed.peer_status("alpha", "wgpeer")
        client = bed.ns["alpha"].popen("iperf3", "-c", str(me.address(4)), "-t", "5", "-J",
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        out, err = client.communicate(timeout=40)
        assert client.returncode == 0, err + out[-2000:]
        result = json.loads(out)
        received = result["end"]["sum_received"]["bytes"]
        assert received > 0, result["end"]
    finally:
        if client is not None:
            terminate(client)
        terminate(server)

    after = bed.peer_status("alpha", "wgpeer")
    assert after["latestHandshake"] is not None
    # Every byte iperf3 received crossed the tunnel from alpha, in transport messages.
    assert after["txBytes"] - before["txBytes"] > received
    assert after["rxBytes"] > before["rxBytes"]  # the acknowledgements
    assert not any(after["drops"].values()), after["drops"]
    rx, tx = wg_transfer(wg)
    assert rx > received and tx > 0, (rx, tx)
    assert wg_latest_handshake(wg) > 0


def test_a_restarted_conn25d_starts_a_handshake_when_wireguard_go_sends_under_the_old_one(
        bed, wireguard):
    """After conn25d restarts, wireguard-go keeps sending under the session it had; alpha
    knows no such session but knows the endpoint it comes from, so it starts a handshake
    at once, and wgpeer's pings get through within seconds (wireguard-go on its own
    would start one only after 15 s without an answer)."""
    wireguard()
    alpha, me = member(bed, "alpha"), member(bed, "wgpeer")
    ping(bed, "alpha", str(me.address(4)))
    bed.stop("alpha")
    bed.start("alpha")
    r = bed.run("wgpeer", "ping", "-n", "-c", "1", "-i", "0.5", "-w", "8", str(alpha.address(4)),
                timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    assert metric(bed, "alpha", "wireguard_handshakes_for_unknown_session") >= 1
    assert metric(bed, "alpha", "wireguard_initiations") >= 1


def test_two_tun_queues_interoperate_with_wireguard_go(bed, wireguard):
    """alpha on two TUN queues (two pump pairs, two sockets sharing its port): pings both
    ways and eight parallel TCP streams to wireguard-go arrive, with nothing dropped."""
    wireguard()
    bed.stop("alpha")
    bed.start("alpha", "--tun-queues", "2")
    alpha, me = member(bed, "alpha"), member(bed, "wgpeer")
    ping(bed, "alpha", str(me.address(4)))
    ping(bed, "wgpeer", str(alpha.address(4)))
    server = bed.ns["wgpeer"].popen("iperf3", "-s", "-1", "-B", str(me.address(4)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: server.poll() is not None or
                 f"{me.address(4)}:5201 " in bed.run("wgpeer", "ss", "-Hltn").stdout, 10,
                 "the iperf3 server in wgpeer")
        r = bed.run("alpha", "iperf3", "-c", str(me.address(4)), "-t", "2", "-P", "8", "-J",
                    timeout=40)
        assert r.returncode == 0, r.stderr + r.stdout[-2000:]
        assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 0
    finally:
        terminate(server)
    doc = bed.status("alpha")
    assert doc is not None and doc["tunQueues"] == 2
    assert sum(q["tun_rx"] for q in doc["datapathQueues"]) == doc["datapath"]["tun_rx"] > 0
    assert not any(bed.peer_status("alpha", "wgpeer")["drops"].values())


def test_crossing_handshakes_with_wireguard_go_lose_no_packet(bed, wireguard, tmp_path):
    """Both ends complete a handshake of their own while holding the other's as
    unconfirmed (transport messages are held back meanwhile, so nothing confirms it).
    wireguard-go then sends under its own keypair, which alpha answered: alpha must have
    kept it, as wireguard-go keeps alpha's, so the first ping gets its reply."""
    wg = wireguard()
    alpha, me = member(bed, "alpha"), member(bed, "wgpeer")
    assert alpha.endpoint is not None
    port = str(alpha.endpoint[1])
    table = "c25crossing"
    # Transport messages (type 4, the first byte after the UDP header) to and from alpha.
    rules = (f"table inet {table} {{\n"
             "  chain out { type filter hook output priority 0; "
             f"udp dport {port} @ih,0,8 4 counter drop; }}\n"
             "  chain in { type filter hook input priority 0; "
             f"udp sport {port} @ih,0,8 4 counter drop; }}\n"
             "}\n")
    (tmp_path / "hold.nft").write_text(rules)
    bed.run("wgpeer", "nft", "-f", str(tmp_path / "hold.nft"), check=True)
    try:
        # wireguard-go initiates; alpha answers and holds that keypair as next.
        bed.run("wgpeer", "ping", "-n", "-c", "1", "-W", "1", str(alpha.address(4)))
        wait_for(lambda: wg_latest_handshake(wg) > 0, 10, "wireguard-go's handshake")
        # alpha has no confirmed session: its packet makes it initiate, and wireguard-go
        # answers, holding alpha's keypair as its next.
        bed.run("alpha", "ping", "-n", "-c", "1", "-W", "1", str(me.address(4)))
        wait_for(lambda: metric(bed, "alpha", "wireguard_handshakes_completed") == 2, 10,
                 "alpha's own handshake")
        assert metric(bed, "alpha", "wireguard_initiations") >= 1
    finally:
        bed.run("wgpeer", "nft", "delete", "table", "inet", table)
    ping(bed, "wgpeer", str(alpha.address(4)), count=1, wait=3)
    assert metric(bed, "alpha", "wireguard_handshakes_for_unknown_session") == 0
    assert metric(bed, "alpha", "wireguard_handshakes_completed") == 2
