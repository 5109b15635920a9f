"""`conn25d demo`, the first command a new user runs: works and leaves nothing behind."""

import re
import subprocess
import sys

import pytest

from conn25.lab.netns import sh

pytestmark = pytest.mark.root


def test_demo_fetches_through_the_connector_and_cleans_up():
    before = set(sh("ip", "netns", "list").stdout.split())
    r = subprocess.run([sys.executable, "-m", "conn25", "demo"], capture_output=True,
                       text=True, timeout=180)
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
    assert set(sh("ip", "netns", "list").stdout.split()) <= before
