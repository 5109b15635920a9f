"""The `conn25d` command line: `check`, --help, --version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conn25 import __version__
from conn25.daemon.cli import main

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
    path.write_text(json.dumps({"nodes": [
        {"name": "a", "addresses": ["100.64.0.1"], "endpoint": "192.0.2.1"}]}))
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

    rc = main(["up", "--tailnet", str(EXAMPLE), "--hostname", "gh-connector-1",
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
    rc = main(["up", "--tailnet", str(EXAMPLE), "--hostname", "laptop",
               "--state-dir", str(tmp_path), "--dns-allow", "192.0.2.0/24, 2001:db8::/32"])
    assert rc == 0
    assert seen[0].dns_allow == ("192.0.2.0/24", "2001:db8::/32")
