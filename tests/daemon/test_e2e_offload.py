"""conn25d end to end with TUN offloads on (the default) and forced off
(--tun-offload=false), in namespaces this module creates: a client and a connector.
With them on, the client's kernel hands its TUN TCP super-packets, which the datapath
splits; with them off, it reads packet by packet. Either way a 16 MiB upload and
download through the connector arrive whole (length and SHA-256 checked at the other
end), and the client's counters show whether super-packets were read and split.
(CONN25_TUN_OFFLOAD=0 runs every other end-to-end test with the offloads off; this
module runs both modes whatever the environment says.)
"""

from __future__ import annotations

import hashlib
import random

import pytest

from conn25.lab.testbed import Testbed, pattern_page

pytestmark = pytest.mark.root

SIZE = 16 << 20


@pytest.fixture(scope="module", params=[True, False], ids=["offload-on", "offload-off"])
def bed(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("testbed")
    tb = Testbed(workdir, tun_offload=request.param)
    with tb:
        for name in ("conn1", "client"):
            tb.start(name)
        yield tb


def upload(bed: Testbed, path, family: str) -> list[str]:
    r = bed.run("client", "curl", "-sS", family, "-m", "60", "--data-binary", f"@{path}",
                "-H", "Content-Type: application/octet-stream",
                "http://upload.wild.example.com/digest", timeout=90)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_a_large_upload_and_download_arrive_whole_through_split_super_packets(bed, tmp_path):
    body = random.Random(13).randbytes(SIZE)
    (tmp_path / "upload.bin").write_bytes(body)
    assert upload(bed, tmp_path / "upload.bin", "-4") == [str(SIZE),
                                                         hashlib.sha256(body).hexdigest()]

    r = bed.run("client", "curl", "-sS", "-4", "-m", "60", "-o", str(tmp_path / "page"),
                f"http://download.wild.example.com/pattern/{SIZE}", timeout=90)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "page").read_bytes() == pattern_page(SIZE)

    doc = bed.status("client")
    dp = doc["datapath"]
    assert dp["drop_offload_header"] == dp["drop_offload_packet"] == 0
    assert bed.status("conn1")["tunOffload"] == doc["tunOffload"]
    if not bed.tun_offload:
        assert doc["tunOffload"] == "off"
        assert dp["tun_rx_super_packets"] == dp["tun_rx_segments"] == 0
        return
    assert doc["tunOffload"] in ("tso", "tso+uso")
    # The upload left the client's stack as super-packets, split by the datapath.
    assert dp["tun_rx_super_packets"] > 0
    assert dp["tun_rx_segments"] >= SIZE // 1420


def test_ipv6_super_packets_are_split_too(bed, tmp_path):
    before = bed.status("client")["datapath"]["tun_rx_super_packets"]
    body = random.Random(14).randbytes(SIZE // 4)
    (tmp_path / "upload6.bin").write_bytes(body)
    assert upload(bed, tmp_path / "upload6.bin", "-6") == [str(len(body)),
                                                          hashlib.sha256(body).hexdigest()]
    dp = bed.status("client")["datapath"]
    assert (dp["tun_rx_super_packets"] > before) == bed.tun_offload
    assert dp["drop_offload_header"] == dp["drop_offload_packet"] == 0
