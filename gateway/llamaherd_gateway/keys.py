"""The gateway's own API keys: a file of keys, one per line (a mounted Secret), read again
when it changes; compared in constant time."""

from __future__ import annotations

import hmac
import os
import time
from pathlib import Path

RECHECK_S = 5.0  # how often the file's mtime is looked at


def parse_keys(text: str) -> frozenset[str]:
    """One key per line; blank lines and lines starting with # are not keys."""
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def key_matches(token: str | None, keys: frozenset[str]) -> bool:
    if not token:
        return False
    # every key is compared, so the time does not tell which prefix matched
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class KeyFile:
    """The keys of ``path``; a missing or empty file refuses every request (fails closed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: frozenset[str] = frozenset()
        self._mtime: float | None = None
        self._checked = 0.0
        self.reload()

    def reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime != self._mtime:
                self.keys = parse_keys(self.path.read_text())
                self._mtime = mtime
        except OSError:
            self.keys, self._mtime = frozenset(), None
        self._checked = time.monotonic()

    def allows(self, authorization: str | None) -> bool:
        if time.monotonic() - self._checked > RECHECK_S:
            self.reload()
        return key_matches(bearer(authorization), self.keys)
