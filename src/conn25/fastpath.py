"""The Python face of the compiled datapath (``conn25._fastpath``).

This module is the whole boundary between the control plane and the
per-packet code: everything the trio shell and the tests use from the
extension is imported here, so a reader finds the contract in one place.

So far: the Internet checksum (RFC 1071) and its incremental update for a
changed address or port (RFC 1624), which the NAT code uses in place.
"""

from __future__ import annotations

from ._fastpath import checksum_replace, internet_checksum, ones_complement_sum

__all__ = ["checksum_replace", "internet_checksum", "ones_complement_sum"]
