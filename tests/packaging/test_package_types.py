"""mypy accepts the whole package: the type hints every module declares agree with each
other and with the typed libraries it uses (dnslib and pyroute2 have none)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_accepts_every_module_of_the_package(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports",
         "--cache-dir", str(tmp_path / "cache"), "-p", "conn25"],
        cwd=ROOT / "src", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout, result.stdout
