"""--accept-dns's direct mode on real files (a resolv.conf the test makes in tmp_path,
never the host's): the original kept, ours written, the original back byte for byte
on exit and after a crash; refusals change nothing. And a bind-mounted file (as
`ip netns exec` makes /etc/resolv.conf), in a mount namespace of the test's own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conn25.core import dnsconfig
from conn25.core.dnsconfig import DNSConfigError, Mode
from conn25.daemon.accept_dns import AcceptDNS
from conn25.daemon.node import Node, NodeOptions
from conn25.daemon.resolvconf import BACKUP_FILE, ResolvConf, read_state
from conn25.daemon.system import SystemSetupError
from conn25.lab.netns import need_root

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tailnet.hujson"

LISTEN = ("100.100.100.100", 53)
ORIGINAL = (b"# written by hand\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"
            b"nameserver 100.100.100.100\nsearch corp.example\noptions edns0\n")


def never_resolved(resolvectl: str) -> bool:
    raise AssertionError("resolved is asked about only for resolved's files")


def accept(tmp_path: Path, path: Path, **kw: object) -> AcceptDNS:
    return AcceptDNS(path=str(path), state_dir=tmp_path / "state", link="conn25",
                     listen=LISTEN, is_resolved_running=never_resolved, **kw)  # type: ignore[arg-type]


def snapshot(path: Path) -> tuple:
    """Everything about ``path`` that restoring must give back."""
    if not os.path.lexists(path):
        return ("missing",)
    st = os.lstat(path)
    if os.path.islink(path):
        return ("symlink", os.readlink(path))
    return ("file", path.read_bytes(), st.st_mode, st.st_uid, st.st_gid)


@pytest.fixture
def resolv(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_bytes(ORIGINAL)
    path.chmod(0o640)
    return path


def test_ours_while_running_and_the_original_back_byte_for_byte(tmp_path, resolv):
    before = snapshot(resolv)
    dns = accept(tmp_path, resolv)
    # The upstreams are the original's, without our own address.
    assert dns.prepare(True) == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    assert dns.mode is Mode.DIRECT
    assert snapshot(resolv) == before  # nothing until the DNS server answers
    dns.apply(["example.com."])
    text = resolv.read_bytes()
    assert dnsconfig.is_ours(text)
    assert b"nameserver 100.100.100.100\nsearch corp.example\noptions edns0\n" in text
    assert b"192.0.2.53" not in text
    assert (resolv.stat().st_mode & 0o777) == 0o640  # the original's mode
    assert dns.status() == {"mode": "resolv.conf", "path": str(resolv),
                            "server": "100.100.100.100"}
    dns.close()
    assert snapshot(resolv) == before
    assert not (tmp_path / "state" / BACKUP_FILE).exists()
    assert sorted(os.listdir(resolv.parent)) == ["resolv.conf"]  # no temporary file left
    dns.close()  # idempotent
    assert snapshot(resolv) == before


def test_after_a_crash_the_next_start_restores_and_reads_the_original(tmp_path, resolv):
    before = snapshot(resolv)
    crashed = accept(tmp_path, resolv)
    crashed.prepare(True)
    crashed.apply(["example.com."])
    # kill -9: no close(). The next run finds our file and the backup.
    assert dnsconfig.is_ours(resolv.read_bytes())
    again = accept(tmp_path, resolv)
    assert again.prepare(True) == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    assert snapshot(resolv) == before
    again.apply(["example.com."])
    again.close()
    assert snapshot(resolv) == before


def test_a_restart_without_accept_dns_still_puts_the_original_back(tmp_path, resolv):
    before = snapshot(resolv)
    crashed = accept(tmp_path, resolv)
    crashed.prepare(True)
    crashed.apply([])
    off = accept(tmp_path, resolv)
    assert off.prepare(False) == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    assert off.mode is Mode.OFF and off.status() == {"mode": "off"}
    assert snapshot(resolv) == before
    off.apply([])
    off.close()
    assert snapshot(resolv) == before


def test_a_symlink_comes_back_as_the_same_symlink(tmp_path):
    target = tmp_path / "resolv.local"
    target.write_bytes(b"nameserver 192.0.2.9\n")
    path = tmp_path / "resolv.conf"
    path.symlink_to("resolv.local")
    before = snapshot(path)
    dns = accept(tmp_path, path)
    assert dns.prepare(True) == [("192.0.2.9", 53)]
    dns.apply([])
    assert not path.is_symlink() and dnsconfig.is_ours(path.read_bytes())
    assert target.read_bytes() == b"nameserver 192.0.2.9\n"  # the link's target untouched
    dns.close()
    assert snapshot(path) == before and target.read_bytes() == b"nameserver 192.0.2.9\n"


def test_a_missing_file_is_missing_again_after(tmp_path):
    path = tmp_path / "resolv.conf"
    dns = accept(tmp_path, path)
    assert dns.prepare(True) == []
    dns.apply([])
    assert dnsconfig.is_ours(path.read_bytes())
    dns.close()
    assert not os.path.lexists(path)


def test_a_file_someone_else_wrote_meanwhile_stays(tmp_path, resolv):
    dns = accept(tmp_path, resolv)
    dns.prepare(True)
    dns.apply([])
    resolv.write_bytes(b"nameserver 192.0.2.77\n")  # e.g. a DHCP client
    dns.close()
    assert resolv.read_bytes() == b"nameserver 192.0.2.77\n"
    assert not (tmp_path / "state" / BACKUP_FILE).exists()


@pytest.mark.parametrize(("hostname", "connector", "flag", "mode"), [
    ("laptop", False, None, Mode.DIRECT),  # a client: on by default
    ("laptop", False, True, Mode.DIRECT),
    ("laptop", False, False, Mode.OFF),
    ("gh-connector-1", True, None, Mode.OFF),  # a pure connector: off by default
    ("gh-connector-1", True, True, Mode.OFF),  # ...and when asked (it serves no DNS): warned
    ("gh-connector-1", False, None, Mode.DIRECT),  # tagged, not advertising: a client
])
def test_which_node_takes_the_dns(tmp_path, resolv, caplog, hostname, connector, flag, mode):
    node = Node(NodeOptions(tailnet=str(EXAMPLE), hostname=hostname,
                            advertise_connector=connector, accept_dns=flag,
                            resolv_conf=str(resolv), state_dir=str(tmp_path / "state")))
    node._load_config()
    assert node._prepare_dns() == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    assert node.dns_config.mode is mode
    assert ("is a client of no app" in caplog.text) == (connector and flag is True)
    assert resolv.read_bytes() == ORIGINAL  # nothing written before the DNS server serves


def test_a_managed_file_is_refused_and_left_alone(tmp_path, resolv):
    resolv.write_bytes(b"# Generated by NetworkManager\nnameserver 192.0.2.1\n")
    before = snapshot(resolv)
    dns = accept(tmp_path, resolv)
    with pytest.raises(DNSConfigError, match="managed by NetworkManager"):
        dns.prepare(True)
    assert snapshot(resolv) == before and not (tmp_path / "state" / BACKUP_FILE).exists()


def test_resolved_s_file_is_refused_when_resolved_does_not_run(tmp_path):
    path = tmp_path / "resolv.conf"
    path.symlink_to("/run/systemd/resolve/stub-resolv.conf")
    asked: list[str] = []
    dns = AcceptDNS(path=str(path), state_dir=tmp_path / "state", link="conn25",
                    listen=LISTEN, resolvectl="/nonexistent/resolvectl",
                    is_resolved_running=lambda r: asked.append(r) or False)
    with pytest.raises(DNSConfigError, match="systemd-resolved does not run"):
        dns.prepare(True)
    assert asked == ["/nonexistent/resolvectl"]
    assert os.readlink(path) == "/run/systemd/resolve/stub-resolv.conf"


def test_a_failed_write_changes_nothing_and_keeps_no_backup(tmp_path, resolv):
    """Our temporary file's name taken by a directory: the write fails (as it would on a
    read-only /etc), and the file, the state dir and the directory stay as they were."""
    before = snapshot(resolv)
    (resolv.parent / ".resolv.conf.conn25d-tmp").mkdir()
    dns = accept(tmp_path, resolv)
    dns.prepare(True)
    with pytest.raises(SystemSetupError, match=f"writing {resolv} failed"):
        dns.apply([])
    assert snapshot(resolv) == before and not (tmp_path / "state" / BACKUP_FILE).exists()
    dns.close()
    assert snapshot(resolv) == before


def test_an_unreadable_backup_is_a_clear_error(tmp_path, resolv):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / BACKUP_FILE).write_text("{not json")
    with pytest.raises(SystemSetupError, match="put the original back by hand"):
        ResolvConf(str(resolv), tmp_path / "state").recover()


BIND_MOUNTED = textwrap.dedent("""
    import os, subprocess, sys
    from conn25.core import dnsconfig
    from conn25.daemon.accept_dns import AcceptDNS
    source, target, state, end, directory = sys.argv[1:6]
    if directory == "read-only":  # as systemd's ProtectSystem=strict makes /etc
        parent = os.path.dirname(target)
        subprocess.run(["mount", "--bind", parent, parent], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", parent], check=True)
        try:
            open(os.path.join(parent, "probe"), "w")
            raise AssertionError("the directory is writable")
        except OSError as e:
            assert e.errno == 30, e  # EROFS: no temporary file there
    subprocess.run(["mount", "--bind", source, target], check=True)
    dns = AcceptDNS(path=target, state_dir=state, link="conn25",
                    listen=("100.100.100.100", 53))
    print(dns.prepare(True))
    dns.apply([])
    # Written in place: the bind mount's source holds our file.
    assert dnsconfig.is_ours(open(source, "rb").read())
    if end == "crash":
        sys.exit(0)
    dns.close()
""")


@pytest.mark.root
@pytest.mark.skipif(need_root() is not None, reason=str(need_root()))
@pytest.mark.parametrize(("end", "directory"), [
    ("exit", "writable"), ("crash", "writable"), ("exit", "read-only")])
def test_a_bind_mounted_file_is_written_in_place_and_restored(tmp_path, end, directory):
    """rename() over a bind mount's target fails with EBUSY (ip netns exec's binding), a
    temporary file in a read-only /etc with EROFS (a systemd service's writable binding
    of resolv.conf): written in place instead. The mounts live in a mount namespace of
    this test's own (unshare)."""
    (tmp_path / "etc").mkdir()
    source, target = tmp_path / "netns-resolv.conf", tmp_path / "etc" / "resolv.conf"
    source.write_bytes(ORIGINAL)
    target.write_bytes(b"nameserver 192.0.2.200\n")  # what the mount covers
    state = tmp_path / "state"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", *args],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    r = run(sys.executable, "-c", BIND_MOUNTED, str(source), str(target), str(state), end,
            directory)
    assert r.returncode == 0, r.stderr
    assert "('192.0.2.53', 53)" in r.stdout
    if end == "crash":
        assert dnsconfig.is_ours(source.read_bytes())
        # The next start, under the same mount, puts the original back in place.
        restart = ("import subprocess, sys\n"
                   "from conn25.daemon.accept_dns import AcceptDNS\n"
                   "subprocess.run(['mount', '--bind', sys.argv[1], sys.argv[2]], check=True)\n"
                   "print(AcceptDNS(path=sys.argv[2], state_dir=sys.argv[3], link='conn25',"
                   " listen=('100.100.100.100', 53)).prepare(False))\n")
        r = run(sys.executable, "-c", restart, str(source), str(target), str(state))
        assert r.returncode == 0, r.stderr
        assert "('192.0.2.53', 53)" in r.stdout
    assert source.read_bytes() == ORIGINAL
    assert target.read_bytes() == b"nameserver 192.0.2.200\n"
    assert read_state(str(source)).kind == "file"
    assert not (state / BACKUP_FILE).exists()
