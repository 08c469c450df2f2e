"""The gateway's own API keys and what each may ask for: files (mounted Secrets) read again when
they change; keys compared in constant time.

- The keys file: one key per line.
- The priority limits file: ``<key> <max priority>`` per line, the highest priority (0-9 or a
  name: low, normal, high, critical) that a client sending ``Authorization: Bearer <key>`` may
  ask for; every other client gets ``max_priority``.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

from llamaherd_server.protocol import parse_priority

log = logging.getLogger("llamaherd_gateway.keys")

RECHECK_S = 5.0  # how often a file's mtime is looked at


def parse_keys(text: str) -> frozenset[str]:
    """One key per line; blank lines and lines starting with # are not keys."""
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def parse_priority_limits(text: str) -> tuple[tuple[str, int], ...]:
    """``<key> <max priority>`` per line; blank lines and # comments skipped, and lines that do
    not read (logged without the key): their key gets the default limit."""
    limits: list[tuple[str, int]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected '<key> <max priority>'")
            limits.append((fields[0], parse_priority(fields[1])))
        except ValueError as exc:
            log.warning("priority limits, line %d skipped: %s", number, exc)
    return tuple(limits)


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(errors="surrogatepass"), b.encode(errors="surrogatepass"))


def key_matches(token: str | None, keys: frozenset[str]) -> bool:
    if not token:
        return False
    # every key is compared, so the time does not tell which prefix matched
    found = False
    for key in keys:
        found |= _same(token, key)
    return found


class WatchedFile:
    """A file read again when its mtime changes (looked at every RECHECK_S); a missing or
    unreadable file reads as empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._checked = 0.0
        self.reload()

    def load(self, text: str) -> None:
        raise NotImplementedError

    def reload(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime != self._mtime:
                self.load(self.path.read_text())
                self._mtime = mtime
        except (OSError, UnicodeDecodeError):
            self.load("")
            self._mtime = None
        self._checked = time.monotonic()

    def fresh(self) -> None:
        if time.monotonic() - self._checked > RECHECK_S:
            self.reload()


class KeyFile(WatchedFile):
    """The keys of ``path``; a missing or empty file refuses every request (fails closed)."""

    keys: frozenset[str] = frozenset()

    def load(self, text: str) -> None:
        self.keys = parse_keys(text)

    def allows(self, authorization: str | None) -> bool:
        self.fresh()
        return key_matches(bearer(authorization), self.keys)


class PriorityLimits(WatchedFile):
    """Each key's highest priority; a missing file gives every client the default."""

    limits: tuple[tuple[str, int], ...] = ()

    def load(self, text: str) -> None:
        self.limits = parse_priority_limits(text)

    def limit_for(self, authorization: str | None, default: int) -> int:
        self.fresh()
        token = bearer(authorization)
        if not token:
            return default
        found = default
        for key, limit in self.limits:  # all compared: the time does not tell which matched
            if _same(token, key):
                found = limit
        return found
