"""Passive outlier detection, as Envoy does it: a replica whose requests fail several times in a
row (refused or broken connections, 5xx answers of its own) is ejected from picking for a while.

- ``consecutive_failures`` failures in a row eject it; any success resets the count.
- The n-th ejection of a replica lasts ``n x base_s`` (at most ``max_s``); each ``base_s`` it
  then spends back in service forgives one, so a replica that fails once a day is not punished
  as one that fails every minute.
- Back in service, it needs ``consecutive_failures`` new failures to go out again.
- Whether an ejection may happen at all (the floor of endpoints a service keeps, whatever
  fails) is the caller's: :func:`llamaherd_gateway.picker.ejectable` and
  :func:`llamaherd_gateway.picker.in_service`, pure functions over what this returns.

The state is per endpoint and apart from the picker, which sees only a snapshot
(:meth:`OutlierDetector.ejected`, :meth:`OutlierDetector.failures`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


@dataclass
class Health:
    failures: int = 0  # in a row, since the last success or ejection
    ejections: int = 0  # the multiplier of the next ejection's length, less what was forgiven
    ejected_at: float | None = None  # None: in service
    until: float = 0.0  # end of the current (or last) ejection


class OutlierDetector(Generic[T]):
    def __init__(
        self,
        consecutive_failures: int,
        base_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consecutive_failures = consecutive_failures
        self.base_s = base_s
        self.max_s = max_s
        self.clock = clock
        self._health: dict[T, Health] = {}

    def success(self, endpoint: T) -> None:
        health = self._health.get(endpoint)
        if health is not None:
            health.failures = 0

    def failure(self, endpoint: T, may_eject: bool = True) -> float | None:
        """Count one failure; the ejection's length when this one ejects the endpoint (only
        when ``may_eject``: the caller keeps its floor), else None."""
        health = self._health.setdefault(endpoint, Health())
        now = self.clock()
        self._end_if_over(health, now)
        health.failures += 1
        if (
            self.consecutive_failures <= 0
            or health.ejected_at is not None
            or health.failures < self.consecutive_failures
            or not may_eject
        ):
            return None
        if health.ejections and now > health.until:
            forgiven = int((now - health.until) // self.base_s)
            health.ejections = max(0, health.ejections - forgiven)
        health.ejections += 1
        length = min(self.max_s, self.base_s * health.ejections)
        health.ejected_at, health.until, health.failures = now, now + length, 0
        return length

    def ejected(self) -> dict[T, float]:
        """The endpoints ejected now, each with the time it was ejected."""
        now = self.clock()
        out: dict[T, float] = {}
        for endpoint, health in self._health.items():
            self._end_if_over(health, now)
            if health.ejected_at is not None:
                out[endpoint] = health.ejected_at
        return out

    def failures(self, endpoint: T) -> int:
        health = self._health.get(endpoint)
        return health.failures if health is not None else 0

    def forget(self, keep: Iterable[T]) -> None:
        """Drop the state of endpoints that are gone (an address may come back as a new pod)."""
        kept = set(keep)
        for endpoint in [e for e in self._health if e not in kept]:
            del self._health[endpoint]

    @staticmethod
    def _end_if_over(health: Health, now: float) -> None:
        if health.ejected_at is not None and now >= health.until:
            health.ejected_at, health.failures = None, 0
