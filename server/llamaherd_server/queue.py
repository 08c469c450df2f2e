"""The waiting room in front of the engine: a bounded priority queue with aging.

Order: a higher ``priority`` goes first; within a priority, first come first served.

Aging: a request gains one priority level for every ``aging_seconds`` it has waited, so low
priority cannot starve forever under sustained high-priority load. A priority-0 request that
has waited ``2 * aging_seconds`` ranks with a priority-2 request that has just arrived (and
ahead of it when it arrived earlier than that). Because every waiting request ages at the same
rate, the rank ``priority - arrival / aging_seconds`` never changes while a request waits, so a
plain heap keeps the order and no re-sorting is needed.

The queue is shared by the asyncio side (which puts and cancels) and the engine thread (which
pops), so every method takes the lock.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    priority: int
    arrival: float


T = TypeVar("T", bound=Queued)


class QueueFull(Exception):
    """The queue holds ``limit`` requests already."""


class PriorityQueue(Generic[T]):
    def __init__(
        self,
        limit: int,
        aging_seconds: float = 10.0,
        on_change: Callable[[dict[int, int]], None] | None = None,
    ) -> None:
        if aging_seconds <= 0:
            raise ValueError("aging_seconds must be > 0")
        self.limit = limit
        self.aging_seconds = aging_seconds
        self._heap: list[tuple[float, int, T]] = []
        self._live: dict[int, T] = {}  # entry number -> item, for items not popped or removed
        self._numbers: dict[int, int] = {}  # id(item) -> entry number
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._on_change = on_change
        self._by_priority: dict[int, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def rank(self, item: T) -> float:
        """Smaller ranks leave first (the heap is a min-heap)."""
        return -(item.priority - item.arrival / self.aging_seconds)

    def put(self, item: T, *, force: bool = False) -> None:
        """Queue an item; QueueFull past the limit, unless ``force`` (an item that was taken
        out to run and is put back keeps its place in line: its rank is by its arrival)."""
        with self._lock:
            if not force and len(self._live) >= self.limit:
                raise QueueFull(f"queue is full ({self.limit} waiting)")
            number = next(self._counter)
            heapq.heappush(self._heap, (self.rank(item), number, item))
            self._live[number] = item
            self._numbers[id(item)] = number
            self._count(item.priority, +1)

    def pop(self) -> T | None:
        """The item that ranks first, or None when empty."""
        with self._lock:
            while self._heap:
                _, number, item = heapq.heappop(self._heap)
                if self._live.pop(number, None) is not None:
                    del self._numbers[id(item)]
                    self._count(item.priority, -1)
                    return item
            return None

    def remove(self, item: T) -> bool:
        """Take an item out before it is popped (cancellation, timeout). True if it was here."""
        with self._lock:
            number = self._numbers.pop(id(item), None)
            if number is None:
                return False
            del self._live[number]
            self._count(item.priority, -1)
            if len(self._heap) > 64 and len(self._heap) > 4 * len(self._live):
                self._heap = [e for e in self._heap if e[1] in self._live]
                heapq.heapify(self._heap)
            return True

    def items(self) -> list[T]:
        with self._lock:
            return list(self._live.values())

    def depth_by_priority(self) -> dict[int, int]:
        with self._lock:
            return dict(self._by_priority)

    def _count(self, priority: int, delta: int) -> None:
        self._by_priority[priority] = self._by_priority.get(priority, 0) + delta
        if self._on_change is not None:
            self._on_change(dict(self._by_priority))
