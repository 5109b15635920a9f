"""The service manager's notification protocol on real unix datagram sockets: a path
and an abstract name, what the messages hold, and a manager that is not there.
(test_service_notify.py runs the real node against such a socket.)"""

from __future__ import annotations

import logging
import os
import re
import socket

import pytest

from conn25.daemon.sdnotify import Notifier, socket_address, watchdog_interval


def bound(address: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


def test_messages_go_to_a_socket_path(tmp_path):
    path = tmp_path / "notify"
    with bound(str(path)) as manager:
        n = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        assert n.enabled
        assert n.ready("serving")
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving"
        assert n.stopping()
        assert manager.recv(4096) == b"STOPPING=1"
        assert n.watchdog()
        assert manager.recv(4096) == b"WATCHDOG=1"
        assert n.reloading()
        lines = manager.recv(4096).decode().split("\n")
        assert lines[0] == "RELOADING=1"
        assert re.fullmatch(r"MONOTONIC_USEC=[1-9]\d*", lines[1])


def test_an_at_sign_names_an_abstract_socket():
    name = f"conn25d-test-{os.getpid()}"
    with bound(b"\0" + name.encode()) as manager:
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready()
        assert manager.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_no_manager_means_every_call_does_nothing(value):
    n = Notifier.from_environ({"NOTIFY_SOCKET": value} if value else {})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()
    assert n.watchdog_interval is None


def test_socket_address():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("abc") is None


def test_a_manager_gone_away_is_logged_once_and_never_raised(tmp_path, caplog):
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, "conn25d.sdnotify"):
        assert not n.ready()
        assert not n.watchdog()
    assert len(caplog.records) == 1
    assert "cannot notify the service manager" in caplog.records[0].getMessage()


def test_a_full_queue_drops_the_message_instead_of_blocking(tmp_path):
    path = tmp_path / "notify"
    with bound(str(path)) as manager:
        n = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        sent = [n.watchdog() for _ in range(5000)]  # nobody reads: the queue fills
        assert sent[0] and not sent[-1]
        manager.recv(4096)


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_timeout_for_this_process(env, interval):
    assert watchdog_interval(env, 42) == interval


def test_no_watchdog_without_a_socket():
    assert Notifier.from_environ({"WATCHDOG_USEC": "1000000"}).watchdog_interval is None
