"""The `conn25d` command line: `check`, `genkey`, `pubkey`, --help, --version."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conn25 import __version__
from conn25.core.wireguard import keys as wgkeys
from conn25.daemon import keyfile
from conn25.daemon.cli import main
from conn25.daemon.tailnetfile import load_file
from nodekeys import with_keys

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "tailnet.hujson"
FOUR_ERRORS = Path(__file__).parent.parent / "data" / "four_errors.hujson"


def test_check_valid_file_exits_0_and_says_so(capsys):
    assert main(["check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{EXAMPLE}: valid (3 nodes, 1 app)\n"
    assert err == ""


def test_check_counts_in_the_singular_and_plural(tmp_path, capsys):
    path = tmp_path / "one.hujson"
    path.write_text(json.dumps(with_keys({"nodes": [
        {"name": "a", "addresses": ["100.64.0.1"], "endpoint": "192.0.2.1"}]})))
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: valid (1 node, 0 apps)\n"


def test_check_lists_all_four_errors_and_exits_nonzero(capsys):
    """The issue's case: a "*" connector, an unknown tag, overlapping pools and a
    duplicate node address are all reported, one a line, prefixed by the file."""
    assert main(["check", str(FOUR_ERRORS)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{FOUR_ERRORS}: ") for line in lines)
    apps = 'nodeAttrs[0].app["tailscale.com/app-connectors"]'
    pools = 'nodeAttrs[1].app["tailscale.com/app-connectors-experimental-ippools"][0]'
    expected = [
        f'{apps}[0].connectors[0]: connector ("*") must be a tag',
        f'{apps}[1].connectors[0]: tag "tag:docs-connector" has no tagOwners entry',
        f"{pools}.v4MagicIPPool[0]: v4MagicIPPool 100.80.0.0-100.80.255.255 overlaps "
        f"v4TransitIPPool 100.80.128.0-100.80.128.255 at {pools}.v4TransitIPPool[0]",
        'nodes[1] ("gh-connector-1").addresses[0]: duplicate address 100.64.0.1 '
        '(also nodes[0] ("laptop").addresses[0])',
    ]
    assert sorted(lines) == sorted(f"{FOUR_ERRORS}: {e}" for e in expected)


def test_check_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.hujson"
    path.write_text('{\n  "nodes": [\n    {"name": "a"\n    "x": 1},\n  ],\n}\n')
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:4:5: syntax error: ")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["absent.hujson", "."])
def test_check_unreadable_file_exits_2_with_a_clear_error(tmp_path, capsys, name):
    path = tmp_path / name
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"conn25d: cannot read {path}: ")
    assert "No such file" in err or "directory" in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"conn25d {__version__}"


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: conn25d" in out and "check" in out and "validate a tailnet file" in out


def test_check_help_explains_the_exit_status(capsys):
    assert main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "FILE" in out and "0 when valid" in out and "2 when the file cannot be read" in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["check"], ["check", "a", "b"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: conn25d" in capsys.readouterr().err


@pytest.mark.parametrize("queues", ["0", "17", "two", "1.5"])
def test_up_refuses_a_bad_number_of_tun_queues_before_starting(queues, capsys):
    assert main(["up", "--tailnet", "x", "--hostname", "y", "--tun-queues", queues]) == 2
    err = capsys.readouterr().err
    assert f"--tun-queues: {queues!r} is not a number of TUN queues (1-16)" in err


@pytest.mark.skipif(shutil.which("conn25d") is None, reason="conn25d script not installed")
def test_installed_script_checks_the_example():
    result = subprocess.run(["conn25d", "check", "examples/tailnet.hujson"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "examples/tailnet.hujson: valid (3 nodes, 1 app)\n"


def test_module_entry_point_exits_with_mains_status():
    result = subprocess.run([sys.executable, "-m", "conn25", "check", str(FOUR_ERRORS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 4


def example_for(tmp_path: Path, name: str, key: Path | None = None) -> Path:
    """A copy of the example tailnet in which node ``name``'s publicKey is that of a new
    private key at ``key`` (default: where up looks with --state-dir tmp_path)."""
    private = keyfile.create(key or tmp_path / "private.key")
    node = load_file(EXAMPLE).node(name)
    assert node is not None
    path = tmp_path / "tailnet.hujson"
    path.write_text(EXAMPLE.read_text().replace(
        wgkeys.encode(node.public_key), wgkeys.encode(wgkeys.public_from_private(private))))
    return path


def test_up_with_an_unknown_hostname_fails_cleanly(capsys, tmp_path):
    """`conn25d up` reports a configuration problem in one line, exit 1, no traceback."""
    from conn25.daemon.cli import main

    rc = main(["up", "--tailnet", str(EXAMPLE), "--hostname", "nosuch",
               "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == f"conn25d: {EXAMPLE}: no node named 'nosuch'"


def test_up_with_mismatched_advertise_tags_fails_cleanly(capsys, tmp_path):
    from conn25.daemon.cli import main

    rc = main(["up", "--tailnet", str(example_for(tmp_path, "gh-connector-1")),
               "--hostname", "gh-connector-1",
               "--advertise-tags", "tag:other", "--state-dir", str(tmp_path)])
    assert rc == 1
    assert "--advertise-tags tag:other does not match" in capsys.readouterr().err


def test_status_without_a_node_says_so(capsys, tmp_path):
    from conn25.daemon.cli import main

    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    assert "cannot reach the node" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "message"), [
    ("192.0.2.1/24", "has host bits set; did you mean 192.0.2.0/24?"),
    ("192.0.2.0/24,not-a-net", "'not-a-net' is not a network"),
])
def test_up_rejects_a_bad_dns_allow_with_a_clear_error(value, message, capsys, tmp_path):
    rc = main(["up", "--tailnet", str(EXAMPLE), "--hostname", "laptop",
               "--state-dir", str(tmp_path), "--dns-allow", value])
    err = capsys.readouterr().err
    assert rc == 2
    assert "argument --dns-allow" in err and message in err


def test_up_passes_dns_allow_to_the_node(monkeypatch, tmp_path):
    seen = []

    def fake_run(fn, options):
        seen.append(options)

    import trio

    monkeypatch.setattr(trio, "run", fake_run)
    rc = main(["up", "--tailnet", str(example_for(tmp_path, "laptop")), "--hostname", "laptop",
               "--state-dir", str(tmp_path), "--dns-allow", "192.0.2.0/24, 2001:db8::/32"])
    assert rc == 0
    assert seen[0].dns_allow == ("192.0.2.0/24", "2001:db8::/32")


# -- up and the private key ---------------------------------------------------------


@pytest.fixture
def no_node(monkeypatch):
    """trio.run replaced: the options up would start the node with, and no node."""
    import trio

    started = []
    monkeypatch.setattr(trio, "run", lambda fn, options: started.append(options))
    return started


def public_of(path: Path) -> str:
    return wgkeys.encode(wgkeys.public_from_private(keyfile.load_or_create(path)[0]))


def test_up_makes_a_key_and_says_in_one_line_which_key_to_put_where(tmp_path, capsys, no_node):
    state = tmp_path / "state"
    argv = ["up", "--tailnet", str(EXAMPLE), "--hostname", "gh-connector-1",
            "--state-dir", str(state)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    key = state / "private.key"
    assert oct(key.stat().st_mode & 0o777) == oct(0o600)
    assert out == "" and no_node == []
    assert err == (f'conn25d: nodes[1] ("gh-connector-1").publicKey in {EXAMPLE} must be '
                   f'"{public_of(key)}" (the public key of {key}, made just now)\n')
    private_text = key.read_text().strip()
    # The second start uses the same key, and still refuses.
    assert main(argv) == 1
    again = capsys.readouterr().err
    assert again == err.replace(", made just now", "")
    assert private_text not in err + again and key.read_text().strip() == private_text


def test_up_names_the_place_of_a_missing_public_key_although_the_file_is_invalid(
        tmp_path, capsys, no_node):
    """A new node's entry has no publicKey yet: the file fails `check`, and up says what
    to put there rather than listing the file's errors."""
    text = EXAMPLE.read_text()
    laptop = wgkeys.encode(load_file(EXAMPLE).node("laptop").public_key)
    path = tmp_path / "tailnet.hujson"
    path.write_text(text.replace(f'"publicKey": "{laptop}",', ""))
    assert main(["check", str(path)]) == 1
    capsys.readouterr()
    assert main(["up", "--tailnet", str(path), "--hostname", "laptop",
                 "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'conn25d: nodes[0] ("laptop").publicKey in {path} must be '
                          f'"{public_of(tmp_path / "private.key")}"')
    assert len(err.splitlines()) == 1


def test_up_starts_the_node_when_the_file_holds_its_public_key(tmp_path, capsys, no_node):
    tailnet = example_for(tmp_path, "laptop")
    assert main(["up", "--tailnet", str(tailnet), "--hostname", "laptop",
                 "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
    assert no_node[0].private_key_path == tmp_path / "private.key"


def test_up_private_key_names_the_key_file(tmp_path, capsys, no_node):
    key = tmp_path / "keys" / "laptop.key"
    tailnet = example_for(tmp_path, "laptop", key)
    state = tmp_path / "state"
    assert main(["up", "--tailnet", str(tailnet), "--hostname", "laptop",
                 "--state-dir", str(state), "--private-key", str(key)]) == 0
    assert no_node[0].private_key == str(key) and no_node[0].private_key_path == key
    assert not (state / "private.key").exists()
    # The same file with another node's entry: refused, naming this file.
    assert main(["up", "--tailnet", str(tailnet), "--hostname", "gh-connector-1",
                 "--state-dir", str(state), "--private-key", str(key)]) == 1
    assert f"(the public key of {key})" in capsys.readouterr().err


def test_up_refuses_a_key_file_others_may_read_in_one_line(tmp_path, capsys, no_node):
    tailnet = example_for(tmp_path, "laptop")
    key = tmp_path / "private.key"
    key.chmod(0o644)
    assert main(["up", "--tailnet", str(tailnet), "--hostname", "laptop",
                 "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"conn25d: the private key {key} is open to group or others")
    assert len(err.splitlines()) == 1 and no_node == []
    assert key.read_text().strip() not in err


def test_up_with_a_key_from_wg_genkey_wants_the_public_key_wg_pubkey_gives(
        tmp_path, capsys, no_node):
    key = tmp_path / "private.key"
    private = run([WG, "genkey"]).stdout
    keyfile.create(key, wgkeys.decode(private.strip()))
    assert main(["up", "--tailnet", str(EXAMPLE), "--hostname", "laptop",
                 "--state-dir", str(tmp_path)]) == 1
    wanted = run([WG, "pubkey"], private).stdout.strip()
    assert f'must be "{wanted}" (the public key of {key})' in capsys.readouterr().err


# -- genkey and pubkey ------------------------------------------------------------

# RFC 7748 section 6.1: Alice's private key and the public key X25519 gives for it.
RFC_PRIVATE = base64.b64encode(bytes.fromhex(
    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")).decode()
RFC_PUBLIC = base64.b64encode(bytes.fromhex(
    "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")).decode()
CONN25D = [sys.executable, "-m", "conn25"]
# wireguard-tools' wg, which install.sh --dev installs: the tests with it do not skip.
WG = "wg"


def pubkey(stdin: bytes, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    status = main(["pubkey"])
    out, err = capsys.readouterr()
    return status, out, err


def test_genkey_prints_a_new_clamped_key_each_time(capsys):
    keys = []
    for _ in range(8):
        assert main(["genkey"]) == 0
        out, err = capsys.readouterr()
        assert err == "" and out.endswith("\n") and len(out) == 45
        keys.append(wgkeys.decode(out.strip()))
    assert len(set(keys)) == 8
    assert all(k[0] & 7 == 0 and k[31] & 0xC0 == 0x40 for k in keys)


def test_pubkey_prints_the_public_key_of_the_key_on_stdin(monkeypatch, capsys):
    assert pubkey(f"{RFC_PRIVATE}\n".encode(), monkeypatch, capsys) == (0, RFC_PUBLIC + "\n", "")


@pytest.mark.parametrize("tail", [b"", b"\n", b"\r\n", b"  \n\n", b"\t\0"])
def test_pubkey_allows_trailing_space_as_wg_does(tail, monkeypatch, capsys):
    status, out, _ = pubkey(RFC_PRIVATE.encode() + tail, monkeypatch, capsys)
    assert (status, out) == (0, RFC_PUBLIC + "\n")


@pytest.mark.parametrize(("stdin", "reason"), [
    (b"", "0 characters"),
    (b" " + RFC_PRIVATE.encode(), "45 characters"),  # wg reads no leading space either
    (RFC_PRIVATE.encode() + b" x\n", "46 characters"),
    (RFC_PRIVATE[:-1].encode() + b"\n", "43 characters"),
    (RFC_PRIVATE[:-2].encode() + b"==", "exactly one"),
    (RFC_PRIVATE[:-2].encode() + b"!=", "not base64"),
    (RFC_PRIVATE[:-2].encode() + b"\xc3=", "not base64"),
    (RFC_PRIVATE.replace("=", "A").encode() + b"\n", "exactly one"),
])
def test_pubkey_rejects_a_malformed_key_in_one_line_that_does_not_show_it(
        stdin, reason, monkeypatch, capsys):
    status, out, err = pubkey(stdin, monkeypatch, capsys)
    assert status == 1 and out == ""
    assert err.startswith("conn25d: stdin: ") and reason in err
    assert len(err.splitlines()) == 1
    assert RFC_PRIVATE[:8] not in err and "0xc3" not in err  # no key, no byte of it


def test_help_lists_genkey_and_pubkey(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "print a new private key" in out
    assert "print the public key of a private key read on stdin" in out
    assert main(["pubkey", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "on stdin and print its public key, like 'wg pubkey'" in help_text


def run(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def test_a_key_from_wg_genkey_gives_the_same_public_key_in_both_tools():
    private = run([WG, "genkey"]).stdout
    theirs, ours = run([WG, "pubkey"], private), run([*CONN25D, "pubkey"], private)
    assert theirs.returncode == 0 and ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout and len(ours.stdout) == 45


def test_a_key_from_conn25d_genkey_works_in_wg_pubkey():
    private = run([*CONN25D, "genkey"]).stdout
    theirs, ours = run([WG, "pubkey"], private), run([*CONN25D, "pubkey"], private)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == ours.stdout and len(theirs.stdout) == 45


def test_both_tools_clamp_an_unclamped_key_the_same_way():
    private = base64.b64encode(b"\xff" * 32).decode() + "\n"
    theirs, ours = run([WG, "pubkey"], private), run([*CONN25D, "pubkey"], private)
    assert theirs.returncode == 0 and ours.stdout == theirs.stdout


@pytest.mark.parametrize("stdin", ["", RFC_PRIVATE[:-1], RFC_PRIVATE[:-2] + "B=",
                                   RFC_PRIVATE[:-2] + "==", RFC_PRIVATE + " x"])
def test_both_tools_reject_the_same_malformed_keys(stdin):
    theirs, ours = run([WG, "pubkey"], stdin), run([*CONN25D, "pubkey"], stdin)
    assert theirs.returncode == 1 and ours.returncode == 1
    assert ours.stdout == "" and len(ours.stderr.splitlines()) == 1


def test_check_reports_bad_and_duplicate_public_keys_with_their_places(tmp_path, capsys):
    key = wgkeys.encode(wgkeys.public_from_private(wgkeys.generate_private()))
    path = tmp_path / "keys.hujson"
    path.write_text(json.dumps({"nodes": [
        {"name": "a", "addresses": ["100.64.0.1"], "endpoint": "192.0.2.1", "publicKey": key},
        {"name": "b", "addresses": ["100.64.0.2"], "endpoint": "192.0.2.2", "publicKey": key},
        {"name": "c", "addresses": ["100.64.0.3"], "endpoint": "192.0.2.3",
         "publicKey": key[:-2] + "=="},
    ]}))
    assert main(["check", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.partition(": ")[2].partition(": ")[0] for line in lines] == [
        'nodes[1] ("b").publicKey', 'nodes[2] ("c").publicKey']
    assert "the same public key as nodes[0] (\"a\").publicKey" in lines[0]
    assert "not a WireGuard key" in lines[1] and key[:8] not in lines[1]


# -- up --accept-dns -------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "accept"), [
    ([], None),  # the node decides: on when it is a client of some app
    (["--accept-dns"], True), (["--accept-dns=true"], True),
    (["--accept-dns=false"], False), (["--accept-dns", "no"], False),
])
def test_up_accept_dns_flag(argv, accept, tmp_path, no_node):
    rc = main(["up", "--tailnet", str(example_for(tmp_path, "laptop")), "--hostname", "laptop",
               "--state-dir", str(tmp_path), *argv])
    assert rc == 0
    assert no_node[0].accept_dns is accept
    assert no_node[0].resolv_conf == "/etc/resolv.conf"


def test_up_rejects_an_accept_dns_that_is_not_a_boolean(tmp_path, capsys):
    rc = main(["up", "--tailnet", str(EXAMPLE), "--hostname", "laptop",
               "--state-dir", str(tmp_path), "--accept-dns=maybe"])
    assert rc == 2 and "'maybe' is not true or false" in capsys.readouterr().err


def test_up_refusing_the_dns_says_why_in_one_line_and_leaves_the_file(tmp_path, capsys):
    """A resolv.conf NetworkManager writes: up exits 1 before it sets anything up."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_bytes(b"# Generated by NetworkManager\nnameserver 192.0.2.1\n")
    rc = main(["up", "--tailnet", str(example_for(tmp_path, "laptop")), "--hostname", "laptop",
               "--state-dir", str(tmp_path), "--resolv-conf", str(resolv)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"conn25d: --accept-dns: {resolv} is managed by NetworkManager")
    assert len(err.strip().splitlines()) == 1
    assert resolv.read_bytes() == b"# Generated by NetworkManager\nnameserver 192.0.2.1\n"


@pytest.mark.parametrize(("argv", "offload"), [
    ([], True),  # on by default: the kernel's offloads, whatever of them it has
    (["--tun-offload"], True), (["--tun-offload=false"], False), (["--tun-offload", "off"], False),
])
def test_up_tun_offload_flag(argv, offload, tmp_path, no_node):
    rc = main(["up", "--tailnet", str(example_for(tmp_path, "laptop")), "--hostname", "laptop",
               "--state-dir", str(tmp_path), *argv])
    assert rc == 0
    assert no_node[0].tun_offload is offload
