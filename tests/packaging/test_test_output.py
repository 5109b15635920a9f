"""A failing test's output holds no function's arguments: pytest's long tracebacks print
them, an argument may be a private key, and secrets stay out of test output."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_a_failure_under_a_function_given_a_key_does_not_show_the_key(tmp_path: Path) -> None:
    key = os.urandom(32)
    (tmp_path / "test_leak.py").write_text(textwrap.dedent(f"""
        def configure(private_key):
            raise RuntimeError("the device refused its key")

        def test_it():
            configure(bytes.fromhex("{key.hex()}"))
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(PYPROJECT),
                        "--rootdir", str(tmp_path), "-p", "no:cacheprovider",
                        str(tmp_path / "test_leak.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the device refused its key" in r.stdout
    assert repr(key) not in r.stdout and "private_key =" not in r.stdout
