"""Reading the tailnet file (the core parses what is read here)."""

from __future__ import annotations

import os

from ..core.config import Tailnet
from ..core.tailnet import load_bytes


def load_file(path: str | os.PathLike[str]) -> Tailnet:
    """Load the tailnet file at ``path``; OSError when it cannot be read,
    TailnetError (every error starting with the file's name) when it is bad."""
    with open(path, "rb") as f:
        data = f.read()
    return load_bytes(data, os.fspath(path))
