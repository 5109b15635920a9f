"""The pumps on a real TUN device and real UDP sockets, in namespaces this test creates.

client ns (192.0.2.1) ==veth== connector ns (192.0.2.2, "server" 203.0.113.10 on a dummy)
Real ping and curl run through client TUN -> UDP -> connector TUN -> kernel and back.
"""

import subprocess
import sys

import pytest
from pumpnet import MAGIC, REAL, UNASSIGNED, node_counters, pump_topology, stop_node

from conn25.lab.netns import wait_for

pytestmark = pytest.mark.root


@pytest.fixture
def topology():
    with pump_topology() as t:
        yield t


def test_ping_curl_and_unreachable_through_the_pumps(topology):
    client, connector, c, k = topology
    # ICMP echo: both translations and back.
    r = client.run("ping", "-c", "3", "-i", "0.2", "-W", "5", MAGIC, check=False, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr

    # TCP: a real HTTP server behind the connector, fetched by the magic IP.
    connector.popen(sys.executable, "-m", "http.server", "--bind", REAL, "8080",
                    "--directory", "/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: connector.run("curl", "-sf", "-o", "/dev/null", f"http://{REAL}:8080/",
                                   check=False).returncode == 0, 20, "the HTTP server")
    r = client.run("curl", "-sf", "-m", "10", f"http://{MAGIC}:8080/", check=False, timeout=30)
    assert r.returncode == 0 and "Directory listing" in r.stdout, r.stderr

    # A magic IP without assignment: ICMP host unreachable from the datapath, not a timeout.
    r = client.run("ping", "-c", "1", "-W", "5", UNASSIGNED, check=False, timeout=30)
    assert r.returncode != 0 and "Unreachable" in r.stdout, r.stdout

    # Transport data under an index of no session is dropped; a handshake-sized
    # initiation is queued for the control plane (nobody reads it here).
    client.run(sys.executable, "-c",
               "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
               "s.bind(('192.0.2.1', 41999));"
               "s.sendto(b'\\x04\\x00\\x00\\x00\\x99' + bytes(43), ('192.0.2.2', 41641));"
               "s.sendto(b'\\x01\\x00\\x00\\x00' + bytes(144), ('192.0.2.2', 41641))")
    wait_for(lambda: node_counters(k)["handshakes_received"] == 1, 10,
             "the initiation to be queued")

    cstats, kstats = stop_node(c), stop_node(k)
    cc, kc = cstats["counters"], kstats["counters"]
    assert cc["translated"] >= 6 and cc["unmapped_magic"] == 1 and cc["udp_tx"] >= 6
    assert kc["translated"] >= 6 and kc["flows_created"] >= 2
    assert (kc["drop_unknown_index"], kc["handshakes_received"]) == (1, 1)
    assert kc["drop_auth"] == kc["drop_replay"] == kc["drop_spoofed"] == 0
    assert cc["drop_auth"] == cc["drop_replay"] == cc["drop_spoofed"] == 0
    assert ["flow_created", "client"] in cstats["events"]
    assert ["flow_created", "connector"] in kstats["events"]
