"""A client behind a NAT, with no endpoint in the tailnet file, end to end.

The testbed (conn25.lab.testbed) puts "client" behind a "nat" namespace that masquerades
its LAN to the test internet; the tailnet file gives the client no endpoint and a
persistentKeepalive of 2 s (so the test need not wait the default 25 s). "conn1" is the
connector of the app Example and "peer" a plain node, both with endpoints. The client
makes contact; the others learn where it is from its authenticated datagrams, and learn
again when the NAT gives it a new outside address and port in the middle of a download.
Every wait has a deadline.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e import came_from, resolve

from conn25.core.config import DEFAULT_KEEPALIVE
from conn25.core.tailnet import load_bytes
from conn25.daemon.tailnetfile import load_file
from conn25.lab.netns import terminate, wait_for
from conn25.lab.testbed import APP_TAG, NodeSpec, Testbed, tailnet_file

pytestmark = pytest.mark.root

KEEPALIVE = 2
CLIENT = NodeSpec("client", 1, user="alice@example.com", behind_nat=True, keepalive=KEEPALIVE)
CONN1 = NodeSpec("conn1", 2, tags=(APP_TAG,), connector=True)
PEER = NodeSpec("peer", 3, user="bob@example.com")
NODES = (CLIENT, CONN1, PEER)
KEEPALIVE_SIZE = 32  # a keepalive is a transport message with no payload: 32 bytes


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    with Testbed.serving(tmp_path_factory.mktemp("natbed"), ("conn1", "peer", "client"),
                         nodes=NODES) as tb:
        yield tb


def split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def test_the_client_has_no_endpoint_and_keepalives_by_default():
    """The file the testbed writes: no endpoint for a node behind a NAT, and such a node
    sends persistent keepalives, every 25 s unless the file says otherwise."""
    loaded = load_bytes(tailnet_file(NODES).encode(), "tailnet.hujson").node("client")
    assert loaded is not None
    assert loaded.endpoint is None and loaded.persistent_keepalive == KEEPALIVE
    default = NodeSpec("client", 1, user="alice@example.com", behind_nat=True)
    loaded = load_bytes(tailnet_file((default, CONN1)).encode(), "t.hujson").node("client")
    assert loaded is not None
    assert loaded.endpoint is None and loaded.persistent_keepalive == DEFAULT_KEEPALIVE == 25


def test_the_connector_learns_the_endpoint_of_a_client_behind_nat(bed):
    member = load_file(bed.tailnet_path).node("client")
    assert member is not None and member.endpoint is None
    # The client makes contact (the app's DNS answer needs the connector): after that
    # the connector knows where it is: the NAT's outside address, learnt.
    assert came_from(bed.curl("client", "http://example.com/")) == CONN1.link4
    st = bed.peer_status("conn1", "client")
    assert st["endpointLearned"] is not None and st["latestHandshake"] is not None
    assert split(st["endpoint"])[0] == CLIENT.link4


def test_a_download_survives_a_new_nat_mapping(bed, tmp_path: Path):
    """Mid-download the NAT forgets its mappings and maps the client to another address
    and port range: the connector follows the client to its new endpoint (learnt from
    its next authenticated datagram) and the download completes intact."""
    size, pace = 2_000_000, 400_000  # about 5 s, paced by the server
    magic = resolve(bed, "client", "nat.wild.example.com")
    assert came_from(bed.curl("client", f"http://{magic}/")) == CONN1.link4
    before = bed.peer_status("conn1", "client")
    assert split(before["endpoint"])[0] == CLIENT.link4, before

    out = tmp_path / "download"
    curl = bed.ns["client"].popen("curl", "-sS", "-4", "-m", "60", "-o", str(out),
                                  f"http://{magic}/bytes/{size}?pace={pace}",
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.exists() and out.stat().st_size >= size // 5, 20,
                 "a fifth of the download")
        bed.remap_nat("client")
        at_remap = out.stat().st_size
        assert at_remap < size and curl.poll() is None, "the download ended before the remap"
        after = wait_for(lambda: (lambda st: st if st["endpoint"] != before["endpoint"]
                                  else None)(bed.peer_status("conn1", "client")), 10,
                         "the connector to learn the client's new endpoint")
        host, port = split(after["endpoint"])
        assert host == CLIENT.endpoint and 20000 <= port <= 20999, after
        assert after["endpointLearned"] > before["endpointLearned"]
        _, err = curl.communicate(timeout=60)
        assert curl.returncode == 0, err
    finally:
        terminate(curl)
    data = out.read_bytes()
    # The server sends `size` zero bytes.
    assert len(data) == size and data == bytes(size)
    assert bed.peer_status("conn1", "client")["endpoint"] == after["endpoint"]


def test_the_client_sends_persistent_keepalives_while_idle(bed):
    """Nothing goes from the client to "peer" but keepalives, every KEEPALIVE seconds
    (which also made the session: the first keepalive had none to go under). peer sees
    them as transport messages of 32 bytes each."""
    wait_for(lambda: bed.peer_status("peer", "client")["latestHandshake"], 15,
             "a handshake the client's keepalives started with peer")
    first = bed.peer_status("peer", "client")
    assert first["endpointLearned"] is not None  # peer learnt where the client is
    sent0 = bed.status("client")["metrics"].get("wireguard_keepalives_sent", 0)
    start = time.monotonic()
    later = wait_for(lambda: (lambda st: st if st["rxBytes"] >= first["rxBytes"]
                              + 2 * KEEPALIVE_SIZE else None)(
        bed.peer_status("peer", "client")), 4 * KEEPALIVE + 10,
        "two more keepalives at peer")
    elapsed = time.monotonic() - start
    grown = later["rxBytes"] - first["rxBytes"]
    assert grown % KEEPALIVE_SIZE == 0, grown  # keepalives only: no data went
    # At most one keepalive per KEEPALIVE seconds (and one that may have been on its way).
    assert grown // KEEPALIVE_SIZE <= elapsed / KEEPALIVE + 2, (grown, elapsed)
    assert bed.status("client")["metrics"]["wireguard_keepalives_sent"] >= sent0 + 2
