"""A real systemd-resolved for the tests, on a machine whose PID 1 is not systemd.

Debian's systemd-resolved package, unpacked but not installed (installing it
turns the host's /etc/resolv.conf into a symlink to its stub; `install.sh --dev`
unpacks it into PREFIX/lib/systemd-resolved, CONN25_RESOLVED_DIR names another
place). Run as

    ip netns exec NS unshare --mount --propagation private \\
        python -m conn25.lab.resolved DNS -- COMMAND...

it makes a world of its own in that mount namespace and runs COMMAND in it: a
tmpfs on /run, a D-Bus system bus (dbus-daemon, a policy that lets anyone do
anything: the namespace holds only this test), resolved itself (as nobody, with
the capabilities it keeps when systemd starts it; global server DNS from a
drop-in in /run/systemd/resolved.conf.d) and its stub-resolv.conf bind-mounted
over /etc/resolv.conf, as a system run by resolved has it. resolvectl is on
COMMAND's PATH. Everything started is stopped (by PID) when COMMAND exits; the
mounts go with the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .netns import wait_for

RESOLVED_DIR = Path(os.environ.get("CONN25_RESOLVED_DIR")
                    or Path(sys.prefix) / "lib" / "systemd-resolved")
DAEMON = RESOLVED_DIR / "lib" / "systemd" / "systemd-resolved"
RESOLVECTL_DIR = RESOLVED_DIR / "usr" / "bin"
NOBODY = 65534

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


def unavailable() -> str | None:
    """Why a systemd-resolved cannot run here, or None."""
    missing = [str(p) for p in (DAEMON, RESOLVECTL_DIR / "resolvectl") if not p.exists()]
    missing += [t for t in ("dbus-daemon", "setpriv", "unshare", "mount")
                if shutil.which(t) is None]
    if missing:
        return (f"systemd-resolved cannot run here: {', '.join(missing)} missing "
                "(./install.sh --dev unpacks Debian's systemd-resolved)")
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def main(argv: list[str]) -> int:
    dns, sep, command = argv[0] if argv else "", argv[1:2], argv[2:]
    if sep != ["--"] or not command:
        print("usage: python -m conn25.lab.resolved DNS -- COMMAND...", file=sys.stderr)
        return 2
    # Only inside a mount namespace of its own (not its caller's): /run and
    # /etc/resolv.conf are replaced.
    if os.stat("/proc/self/ns/mnt").st_ino == os.stat(f"/proc/{os.getppid()}/ns/mnt").st_ino:
        print("conn25.lab.resolved: run me under unshare --mount", file=sys.stderr)
        return 2
    _sh("mount", "--make-rprivate", "/")
    _sh("mount", "-t", "tmpfs", "tmpfs", "/run")
    run = Path("/run")
    for d in ("dbus", "systemd/resolve", "systemd/resolved.conf.d"):
        (run / d).mkdir(parents=True)
    os.chown(run / "systemd" / "resolve", NOBODY, NOBODY)
    (run / "systemd/resolved.conf.d/conn25lab.conf").write_text(
        f"[Resolve]\nDNS={dns}\nLLMNR=no\nMulticastDNS=no\nDNSSEC=no\nCache=no\n")
    (run / "dbus/conn25lab.conf").write_text(BUS_CONFIG)
    procs: list[int] = []
    resolved: subprocess.Popen[bytes] | None = None
    try:
        r = subprocess.run(["dbus-daemon", "--config-file=/run/dbus/conn25lab.conf", "--fork",
                            "--nopidfile", "--print-pid"], capture_output=True, text=True,
                           check=True, timeout=20)
        procs.append(int(r.stdout.split()[0]))
        log = open(run / "resolved.log", "w")  # noqa: SIM115 (kept by the process)
        resolved = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+net_bind_service,+net_raw,+setpcap",
             "--ambient-caps=+net_bind_service,+net_raw,+setpcap", str(DAEMON)],
            stdout=log, stderr=subprocess.STDOUT)
        env = {**os.environ, "PATH": f"{RESOLVECTL_DIR}:{os.environ.get('PATH', '')}"}

        def answers() -> bool:
            if resolved.poll() is not None:
                raise RuntimeError("systemd-resolved exited:\n"
                                   + (run / "resolved.log").read_text())
            return subprocess.run(["resolvectl", "--no-pager", "status"], env=env,
                                  capture_output=True, timeout=10).returncode == 0
        wait_for(answers, 15, "systemd-resolved on D-Bus")
        _sh("mount", "--bind", "/run/systemd/resolve/stub-resolv.conf", "/etc/resolv.conf")
        return subprocess.run(command, env=env).returncode
    finally:
        if resolved is not None:
            resolved.terminate()
            resolved.wait(10)
        for pid in procs:  # dbus-daemon, which forked away from us
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
