"""Public keys for the tailnets and members that tests build.

Every node of a tailnet file needs a ``publicKey`` of its own. Tests that are not
about keys take one from here instead of pasting key text: valid (the public key
of a private key derived from a seed), different for every seed, and the same on
every run, so a failure reproduces.
"""

from __future__ import annotations

import hashlib
from typing import Any

from conn25.core.wireguard import keys


def private_key(seed: str) -> bytes:
    """A private key for ``seed``: a test's, never one to use anywhere else."""
    return hashlib.sha256(b"conn25d test key " + seed.encode()).digest()


def public_key(seed: str) -> bytes:
    """The public key (32 bytes) that goes with ``private_key(seed)``."""
    return keys.public_from_private(private_key(seed))


def public_key_text(seed: str) -> str:
    """``public_key(seed)`` as a tailnet file's ``publicKey`` (base64)."""
    return keys.encode(public_key(seed))


def with_keys(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (a tailnet document, changed in place and returned) with a ``publicKey`` on
    every node object that has none, seeded by the node's position so that two nodes
    never share a key, not even two of the same name."""
    for i, node in enumerate(doc.get("nodes", [])):
        if isinstance(node, dict) and "publicKey" not in node:
            node["publicKey"] = public_key_text(f"nodes[{i}]")
    return doc
