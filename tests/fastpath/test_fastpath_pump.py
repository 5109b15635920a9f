"""The pumps on a real TUN device and real UDP sockets, in namespaces this test creates.

client ns (192.0.2.1) ==veth== connector ns (192.0.2.2, "server" 203.0.113.10 on a dummy)
Real ping and curl run through client TUN -> UDP -> connector TUN -> kernel and back.
"""

import subprocess
import sys
from pathlib import Path

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


BLOB = str(Path(__file__).with_name("tcpblob.py"))


def test_tcp_both_ways_with_tun_offloads_splits_super_packets():
    """TUN offloads on both nodes: the sender's kernel hands its TUN super-packets
    (the client's on an upload, the connector's on a download), the datapath splits
    them, and every byte arrives, in both directions."""
    size = 16 << 20
    with pump_topology("offload") as (client, connector, c, k):
        servers = {}
        for mode, port, extra in (("sink", "9000", ()), ("source", "9001", (str(size),))):
            servers[mode] = connector.popen(sys.executable, BLOB, mode, REAL, port, *extra,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True)
            wait_for(lambda p=port: f":{p} " in connector.run("ss", "-Hltn").stdout, 20,
                     f"the {mode} server")
        sent = client.run(sys.executable, BLOB, "send", MAGIC, "9000", str(size),
                          timeout=120).stdout.strip()
        fetched = client.run(sys.executable, BLOB, "fetch", MAGIC, "9001",
                             timeout=120).stdout.strip()
        received = servers["sink"].communicate(timeout=30)[0].strip()
        assert received == sent and sent.split()[0] == str(size)
        assert fetched == sent  # the same blob, the other way
        cstats, kstats = stop_node(c), stop_node(k)
    assert cstats["offload"] != "off" and kstats["offload"] != "off"
    cc, kc = cstats["counters"], kstats["counters"]
    for counters in (cc, kc):
        assert counters["tun_rx_super_packets"] > 0
        assert counters["tun_rx_segments"] > counters["tun_rx_super_packets"]
        assert counters["drop_offload_header"] == counters["drop_offload_packet"] == 0
        assert counters["drop_auth"] == counters["drop_replay"] == 0
