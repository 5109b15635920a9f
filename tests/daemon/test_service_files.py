"""What install.sh puts beside the daemon (packaging/): the systemd unit, checked by
systemd's own tools, and the bash completion and man page generated from the command
line's argparse definitions, run by a real bash and rendered by man."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conn25.daemon.cli import build_parser

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
UNIT = PACKAGING / "conn25d@.service"
EXEC = "/usr/local/bin/conn25d"  # where install.sh links the command


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values, as systemd reads the file (comments, repeated keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(PACKAGING / "generate-docs"), str(out)], check=True,
                   timeout=60)
    return out


# -- the unit ------------------------------------------------------------------------


def test_the_unit_pins_what_the_daemon_relies_on():
    s = unit_settings(UNIT.read_text())["Service"]
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [f"{EXEC} up --tailnet ${{CONN25D_TAILNET}} --hostname %i "
                              "$CONN25D_FLAGS"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] == ["30s"]
    # The daemon's default state dir, /var/lib/conn25d/NAME.
    assert s["StateDirectory"] == ["conn25d/%i"]
    caps = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert set(s["CapabilityBoundingSet"][0].split()) == caps
    assert set(s["AmbientCapabilities"][0].split()) == caps
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "MemoryDenyWriteExecute"):
        assert s[key] == ["yes"], key
    assert s["SystemCallFilter"] == ["@system-service"]
    assert s["ProtectSystem"] == ["strict"]
    # A connector's forwarding sysctls, a client's resolv.conf (--accept-dns), the TUN.
    assert s["ReadWritePaths"] == ["/proc/sys/net -/etc/resolv.conf"]
    assert s["DeviceAllow"] == ["/dev/net/tun rw"]
    assert s["EnvironmentFile"] == ["-/etc/conn25d/%i.env"]
    assert s["Environment"] == ["CONN25D_TAILNET=/etc/conn25d/tailnet.hujson"]


def verify(unit_dir: Path, man_dir: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify of the template's instance "laptop" in `unit_dir`, with the
    man pages of `man_dir` (the unit's Documentation= must resolve)."""
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / "conn25d@laptop.service")],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MANPATH": str(man_dir)})


@pytest.fixture
def unit_dir(tmp_path, generated) -> tuple[Path, Path]:
    """The shipped unit and the generated man page as installed, but for the command's
    path: the test's own conn25d (install.sh's link may not exist where the tests run)."""
    command = Path(sys.executable).parent / "conn25d"
    assert command.exists(), f"{command}: the conn25d command of this Python"
    text = UNIT.read_text()
    assert text.count(EXEC) == 1
    (tmp_path / UNIT.name).write_text(text.replace(EXEC, str(command)))
    man = tmp_path / "man"
    (man / "man8").mkdir(parents=True)
    shutil.copy(generated / "conn25d.8", man / "man8")
    return tmp_path, man


def test_systemd_analyze_verify_finds_nothing_wrong(unit_dir):
    r = verify(*unit_dir)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@pytest.mark.parametrize(("change", "complaint"), [
    (("Type=notify", "Type=notfy"), "Failed to parse service type"),
    (("ProtectSystem=strict", "ProtectSystm=strict"), "Unknown key"),
    (("Documentation=man:conn25d(8)", "Documentation=man:conn25dx(8)"), "man conn25dx(8)"),
])
def test_verify_is_a_real_check(unit_dir, change, complaint):
    path = unit_dir[0] / UNIT.name
    path.write_text(path.read_text().replace(*change))
    r = verify(*unit_dir)
    assert complaint in r.stdout + r.stderr


def test_the_unit_is_hardened(unit_dir):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true",
                        str(unit_dir[0] / "conn25d@laptop.service")],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for conn25d@laptop.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    # 10 is a service without any hardening, root with every capability.
    assert float(m.group(1)) <= 3.0, r.stdout


def test_install_files_puts_everything_in_place(tmp_path):
    root = tmp_path / "root"
    subprocess.run([str(PACKAGING / "install-files"), sys.executable], check=True, timeout=60,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DESTDIR": str(root),
                        **({"PYTHONPATH": p} if (p := os.environ.get("PYTHONPATH")) else {})})
    unit = root / "usr/local/lib/systemd/system/conn25d@.service"
    assert unit.read_text() == UNIT.read_text()
    assert (root / "usr/local/share/bash-completion/completions/conn25d").read_text() \
        .count("_shtab_conn25d")
    assert (root / "usr/local/share/man/man8/conn25d.8").read_text().startswith(".TH CONN25D")
    assert (root / "etc/conn25d").is_dir()
    assert {oct(p.stat().st_mode & 0o777) for p in root.rglob("*") if p.is_file()} == {"0o644"}
    # bash-completion's loader finds it there (/usr/local/share is in its default search).
    r = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", "source /usr/share/bash-completion/bash_completion"
         "; _completion_loader conn25d; complete -p conn25d"],
        capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "XDG_DATA_DIRS": f"{root}/usr/local/share:/usr/share"})
    assert r.stdout.strip() == "complete -o bashdefault -F _shtab_conn25d conn25d", r.stderr


# -- completion ------------------------------------------------------------------------


def complete(script: Path, words: list[str], cwd: Path | None = None) -> list[str]:
    """What bash's completion offers for the last of `words` (the command line so far),
    from the generated script's completion function, in a real bash."""
    line = " ".join(words)
    program = f"""
source {script}
COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE='{line}'
COMP_POINT={len(line)}
fn=$(complete -p conn25d | sed -E 's/.* -F ([^ ]+) .*/\\1/')
"$fn" conn25d '{words[-1]}' '{words[-2]}'
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True,
                       text=True, timeout=30, cwd=cwd, check=True)
    assert r.stderr == ""
    return [x for x in r.stdout.split("\n") if x]


def test_the_completion_is_valid_bash(generated):
    subprocess.run(["bash", "-n", str(generated / "conn25d")], check=True, timeout=30)


def test_the_completion_offers_every_subcommand(generated):
    assert complete(generated / "conn25d", ["conn25d", ""]) == list(subcommands())
    assert complete(generated / "conn25d", ["conn25d", "st"]) == ["status"]


def test_the_completion_offers_every_option_of_up(generated):
    want = {o for a in subcommands()["up"]._actions for o in a.option_strings
            if o.startswith("--")}
    assert {"--tailnet", "--hostname", "--advertise-connector", "--log-level"} <= want
    got = complete(generated / "conn25d", ["conn25d", "up", "--"])
    assert set(got) == want
    assert complete(generated / "conn25d", ["conn25d", "up", "--adv"]) == [
        "--advertise-connector", "--advertise-tags"]


def test_the_completion_offers_values(generated, tmp_path):
    assert complete(generated / "conn25d", ["conn25d", "up", "--log-level", ""]) == [
        "debug", "info", "warning", "error"]
    (tmp_path / "tailnet.hujson").write_text("{}")
    (tmp_path / "other").mkdir()
    assert complete(generated / "conn25d", ["conn25d", "up", "--tailnet", "tai"],
                    cwd=tmp_path) == ["tailnet.hujson"]
    assert complete(generated / "conn25d", ["conn25d", "up", "--state-dir", ""],
                    cwd=tmp_path) == ["other"]


# -- man page ----------------------------------------------------------------------------


def test_the_man_page_renders_and_names_every_subcommand_and_option(generated):
    r = subprocess.run(["man", "-l", str(generated / "conn25d.8")], capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                   "MANWIDTH": "100", "LANG": "C.UTF-8"})
    assert r.returncode == 0, r.stderr
    page = r.stdout
    assert re.match(r"CONN25D\(8\)", page), page[:200]
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "SIGNALS", "FILES", "ENVIRONMENT"):
        assert re.search(rf"^{heading}$", page, re.M), heading
    for name, parser in subcommands().items():
        assert f"conn25d {name}" in page, name
        for action in parser._actions:
            for option in action.option_strings:
                assert option in page, f"{name} {option}"
    assert "/etc/conn25d/tailnet.hujson" in page
