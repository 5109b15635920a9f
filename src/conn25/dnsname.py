"""Domain names as conn25 compares them: lower case, fully qualified.

Also the app-domain index (exact names and ``*.`` wildcards) that decides
which app a queried name belongs to.
"""

from __future__ import annotations

import re

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def normalize(name: str) -> str:
    """Lower-case ``name`` and make it fully qualified (trailing dot).

    ValueError when it is not a valid DNS name. A leading ``*`` label is
    allowed (wildcard patterns are names too).
    """
    if not isinstance(name, str):
        raise ValueError(f"{name!r} is not a domain name")
    fqdn = name.strip().lower()
    if not fqdn.endswith("."):
        fqdn += "."
    if fqdn == ".":
        return fqdn
    if len(fqdn) > 254:
        raise ValueError(f"{name!r} is longer than 253 characters")
    labels = fqdn[:-1].split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 1:
            continue
        if not _LABEL.match(label):
            raise ValueError(f"{name!r} is not a valid domain name (label {label!r})")
    return fqdn


def is_wildcard(fqdn: str) -> bool:
    return fqdn.startswith("*.")


class DomainIndex:
    """Maps a queried name to the apps whose domains match it.

    An exact domain beats a wildcard; otherwise the longest matching
    wildcard wins, and ``*.example.com`` also matches ``example.com``.
    Several apps may share the winning domain; they come out in the order
    they were added, and callers use the first.
    """

    def __init__(self) -> None:
        self._exact: dict[str, list[str]] = {}
        self._wild: dict[str, list[str]] = {}  # keyed by the base, "example.com."

    def add(self, fqdn: str, app: str) -> None:
        """Add a normalised domain (see :func:`normalize`) for ``app``."""
        if is_wildcard(fqdn):
            apps = self._wild.setdefault(fqdn[2:], [])
        else:
            apps = self._exact.setdefault(fqdn, [])
        if app not in apps:
            apps.append(app)

    def lookup(self, name: str) -> list[str]:
        """Apps for ``name`` (any case, dot optional); empty when none match."""
        try:
            fqdn = normalize(name)
        except ValueError:
            return []
        if (apps := self._exact.get(fqdn)) is not None:
            return list(apps)
        # Walk from the full name towards the root: the first base found is
        # the longest matching wildcard.
        rest = fqdn
        while rest and rest != ".":
            if (apps := self._wild.get(rest)) is not None:
                return list(apps)
            _, _, rest = rest.partition(".")
        return []

    def __bool__(self) -> bool:
        return bool(self._exact or self._wild)
