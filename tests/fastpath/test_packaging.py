"""The package as users get it: a platform wheel with the compiled datapath inside, lint-clean."""

import subprocess
import sys
import zipfile
from pathlib import Path

import conn25._fastpath

ROOT = Path(__file__).resolve().parents[2]


def test_fastpath_is_a_compiled_extension():
    assert Path(conn25._fastpath.__file__).suffix == ".so"


def test_pip_wheel_is_a_platform_wheel_with_the_extension(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=600,
    )
    (wheel,) = tmp_path.glob("conn25d-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("conn25/_fastpath") and n.endswith(".so") for n in names), names
    for room in ("core", "daemon", "lab"):  # every package of the tree ships
        assert f"conn25/{room}/__init__.py" in names, names
    assert "conn25/daemon/cli.py" in names
    # typed: the extension's stub and the package's marker are installed
    assert {"conn25/_fastpath.pyi", "conn25/py.typed"} <= set(names), names
    # the Cython sources and build helpers stay out of the installed package
    assert not any(n.endswith((".pyx", ".pxi", ".pxd", ".c")) for n in names)


def test_ruff_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "bench"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
