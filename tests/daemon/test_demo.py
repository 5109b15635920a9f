"""`conn25d demo`, the first command a new user runs: works and leaves nothing behind."""

import re
import subprocess
import sys

import pytest

from conn25.lab.netns import sh

pytestmark = pytest.mark.root


def test_demo_fetches_through_the_connector_and_cleans_up():
    proc = subprocess.Popen([sys.executable, "-m", "conn25", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"resolves example\.com -> 100\.80\.\d+\.\d+", r.stdout), r.stdout
    assert re.search(r"transit IP 169\.254\.\d+\.\d+ -> real 198\.51\.100\.10 with connector conn1",
                     r.stdout), r.stdout
    # The nodes met over WireGuard: the client's view of the connector has a handshake.
    assert re.search(r"over WireGuard: client and conn1 \(public key \S+\.\.\.\) handshook "
                     r"[\d.]+s ago; endpoint 192\.0\.2\.2:41641, [1-9]\d* bytes in",
                     r.stdout), r.stdout
    assert "the web server saw 203.0.113.10" in r.stdout  # conn1's egress address
    assert "the server saw 203.0.113.6" in r.stdout  # the client itself, for a non-app name
    # The demo's namespaces (named after its process id: others may come and go meanwhile).
    mine = re.compile(rf"c25t{proc.pid % 100000}[a-z]+\d+")
    assert not [n for n in sh("ip", "netns", "list").stdout.split() if mine.fullmatch(n)]
