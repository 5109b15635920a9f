"""The wheels of packaging/build-wheels: tagged manylinux, linking nothing but libc and
the system's libcrypto, and installed by pip into a fresh virtual environment that has
no compiler in reach, from which `conn25d demo` runs.

Each wheel is built once per session with the documented command (about a minute: the
sdist, the Cython compile, the repair). The running interpreter's wheel always;
CONN25_WHEEL_PYTHONS (interpreters, separated by spaces) adds others.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from conn25.lab.netns import sh

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging" / "build-wheels"
PLAT = "manylinux_2_34_x86_64"
# What `conn25d demo` runs (src/conn25/lab, src/conn25/daemon/system.py): no compiler.
TOOLS = ("ip", "ss", "sysctl", "nft", "dnsmasq", "curl", "iperf3")


def _version(python: str) -> str:
    return sh(python, "-c", "import sys; print('%d%d' % sys.version_info[:2])").stdout.strip()


PYTHONS = {_version(p): p for p in (sys.executable, *os.environ.get("CONN25_WHEEL_PYTHONS",
                                                                      "").split())}


@pytest.fixture(scope="module", params=sorted(PYTHONS), ids=lambda v: f"cp{v}")
def built(request, tmp_path_factory) -> tuple[str, Path]:
    """(interpreter, its wheel), built by packaging/build-wheels."""
    python = PYTHONS[request.param]
    out = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([str(BUILD), "--python", python, "--tools", sys.executable,
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return python, wheels[0]


def test_the_wheel_is_manylinux_and_links_only_libc_and_libcrypto(built, tmp_path):
    python, wheel = built
    v = _version(python)
    assert re.fullmatch(rf"conn25d-[\w.]+-cp{v}-cp{v}-{PLAT}\.whl", wheel.name), wheel.name
    show = " ".join(sh(sys.executable, "-m", "auditwheel", "show", str(wheel)).stdout.split())
    # The symbol versions the extension needs allow glibc 2.34 (Debian 12, Ubuntu 22.04
    # and later); libcrypto.so.3 is the one library outside the policy, left to the system.
    assert f'constrains the platform tag to "{PLAT}"' in show, show
    assert "libcrypto.so.3 with versions {'OPENSSL_3.0.0'}" in show, show
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if n.endswith(".so") or ".so." in n]
        assert libs == [f"conn25/_fastpath.cpython-{v}-x86_64-linux-gnu.so"], libs
        z.extract(libs[0], tmp_path)
    with open(tmp_path / libs[0], "rb") as f:
        dynamic = next(s for s in ELFFile(f).iter_sections() if isinstance(s, DynamicSection))
        tags = [(t.entry.d_tag, getattr(t, "needed", None)) for t in dynamic.iter_tags()]
    assert sorted(n for tag, n in tags if tag == "DT_NEEDED") == ["libc.so.6", "libcrypto.so.3"]
    # No run path into the build machine's interpreter.
    assert [tag for tag, _ in tags if tag in ("DT_RPATH", "DT_RUNPATH")] == []


@pytest.mark.root
def test_a_fresh_venv_without_a_compiler_installs_it_and_runs_the_demo(built, tmp_path):
    python, wheel = built
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in TOOLS:
        path = sh("sh", "-c", f"command -v {tool}", check=False).stdout.strip()
        assert path, f"{tool} is missing: run ./install.sh"
        (bindir / tool).symlink_to(path)
    # Only those tools on PATH, compilers that fail, and no source distributions: pip
    # installs the wheel and the dependencies' wheels, or fails.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"PATH": str(bindir), "CC": "/bin/false", "CXX": "/bin/false"}
    venv = tmp_path / "venv"

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=timeout)
        assert r.returncode == 0, f"{args}:\n{r.stdout}{r.stderr}"
        return r

    run(python, "-m", "venv", str(venv))
    run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary", ":all:",
        str(wheel))
    where = run(str(venv / "bin" / "python"), "-c",
                "import conn25._fastpath as m; print(m.__file__)").stdout.strip()
    assert where.startswith(str(venv)), where

    demo = subprocess.Popen([str(venv / "bin" / "conn25d"), "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        out, _ = demo.communicate(timeout=180)
    finally:
        demo.kill()
        demo.wait()
    assert demo.returncode == 0, out
    assert re.search(r"resolves example\.com -> 100\.80\.\d+\.\d+", out), out
    assert "the web server saw 203.0.113.10" in out, out  # through conn1's egress
    # The demo's namespaces carry its process id (conn25.lab.netns); other tests' do not.
    mine = re.compile(rf"c25t{demo.pid % 100000}[a-z]")
    assert [n for n in sh("ip", "netns", "list").stdout.split() if mine.match(n)] == []
