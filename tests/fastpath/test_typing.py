"""mypy --strict accepts the daemon's calls into the extension (typed by _fastpath.pyi)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def mypy(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    # follow-imports=silent: errors are reported for these files only, not for
    # the modules they import (which are typed, but not all to --strict).
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), *map(str, files)],
        cwd=ROOT / "src", capture_output=True, text=True, timeout=120,
    )


def test_mypy_accepts_the_boundary_and_the_daemons_calls(tmp_path):
    result = mypy(tmp_path, ROOT / "src/conn25/fastpath.py", HERE / "boundary_calls.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_sees_the_stub_not_any(tmp_path):
    # If the stub were not found, the extension would be Any and nothing would fail.
    bad = tmp_path / "bad_calls.py"
    bad.write_text(
        "from conn25.fastpath import Datapath\n"
        "def f(dp: Datapath) -> bool:\n"
        "    dp.tables.set_route('10.0.0.1', 1)\n"
        "    return any(ev.kind == 'reject' for ev in dp.read_events())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--strict-equality", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), str(bad)],
        cwd=ROOT / "src", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'bad_calls.py:3: error: Argument 1 to "set_route"' in result.stdout, result.stdout
    assert "bad_calls.py:4: error: Non-overlapping equality check" in result.stdout, result.stdout
