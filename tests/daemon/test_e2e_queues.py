"""conn25d end to end on a multi-queue TUN (--tun-queues 2) with TUN offloads on, in
namespaces this module creates: a client and a connector, each with two queues, two pump
pairs and two overlay sockets sharing the port. Sixteen downloads and an upload at once
through the connector arrive whole, and both TUN queues of both nodes read packets:
the flows were spread over the queues' threads.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from conn25.lab.testbed import Testbed, pattern_page

pytestmark = pytest.mark.root

STREAMS = 16


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("testbed")
    tb = Testbed(workdir, tun_offload=True)
    with tb:
        for name in ("conn1", "client"):
            tb.start(name, "--tun-queues", "2")
        yield tb


def test_parallel_streams_spread_over_both_queues_and_arrive_whole(bed, tmp_path):
    sizes = [(1 << 20) + 4099 * i for i in range(STREAMS)]
    outputs = []
    for i, size in enumerate(sizes):
        outputs += ["-o", str(tmp_path / f"page{i}"),
                    f"http://download.wild.example.com/pattern/{size}"]
    r = bed.run("client", "curl", "-sS", "-4", "-m", "60", "-Z", "--parallel-max",
                str(STREAMS), *outputs, timeout=90)
    assert r.returncode == 0, r.stderr
    for i, size in enumerate(sizes):
        assert (tmp_path / f"page{i}").read_bytes() == pattern_page(size), f"download {i}"

    body = random.Random(15).randbytes(4 << 20)
    (tmp_path / "upload.bin").write_bytes(body)
    r = bed.run("client", "curl", "-sS", "-4", "-m", "60", "--data-binary",
                f"@{tmp_path / 'upload.bin'}", "-H", "Content-Type: application/octet-stream",
                "http://upload.wild.example.com/digest", timeout=90)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(body)), hashlib.sha256(body).hexdigest()]

    for name in ("client", "conn1"):
        doc = bed.status(name)
        assert doc["tunQueues"] == 2 and doc["tunOffload"] in ("tso", "tso+uso")
        queues = doc["datapathQueues"]
        assert len(queues) == 2
        # Both queues' TUN -> UDP sides read and sent: the kernel spread the flows.
        assert all(q["tun_rx"] > 0 and q["udp_tx"] > 0 for q in queues), (name, queues)
        # One peer: its datagrams land on one socket, whose thread writes every flow.
        assert sum(q["udp_rx"] for q in queues) == doc["datapath"]["udp_rx"]
        dp = doc["datapath"]
        assert dp["drop_auth"] == dp["drop_replay"] == 0
        assert dp["drop_offload_header"] == dp["drop_offload_packet"] == 0
