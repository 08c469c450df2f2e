from dataclasses import dataclass

import pytest

from llamaherd_server.queue import PriorityQueue, QueueFull


@dataclass(eq=False)
class Item:
    name: str
    priority: int
    arrival: float


def drain(q: PriorityQueue[Item]) -> list[str]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item.name)
    return out


def test_higher_priority_first_fifo_within_priority() -> None:
    q: PriorityQueue[Item] = PriorityQueue(limit=10, aging_seconds=1000)
    for name, prio, t in [("a0", 0, 1), ("b2", 2, 2), ("c1", 1, 3), ("d2", 2, 4), ("e0", 0, 5)]:
        q.put(Item(name, prio, t))
    assert drain(q) == ["b2", "d2", "c1", "a0", "e0"]


def test_aging_lets_a_long_waiting_low_priority_request_through() -> None:
    # One level per 10 s waited: a priority-0 request that arrived 25 s before a priority-2
    # request outranks it (0 + 25/10 > 2), one that arrived 15 s before does not.
    q: PriorityQueue[Item] = PriorityQueue(limit=10, aging_seconds=10)
    q.put(Item("old-low", 0, 100.0))
    q.put(Item("less-old-low", 0, 110.0))
    q.put(Item("new-high", 2, 125.0))
    assert drain(q) == ["old-low", "new-high", "less-old-low"]


def test_sustained_high_priority_load_cannot_starve_low_priority() -> None:
    q: PriorityQueue[Item] = PriorityQueue(limit=1000, aging_seconds=5)
    q.put(Item("low", 0, 0.0))
    served = []
    # A new high-priority request arrives every second and one request is served per second.
    for t in range(1, 60):
        q.put(Item(f"high{t}", 2, float(t)))
        item = q.pop()
        assert item is not None
        served.append(item.name)
        if item.name == "low":
            break
    assert "low" in served
    assert served.index("low") <= 11  # 2 levels x 5 s, plus the request served that second


def test_bounded_length_and_remove() -> None:
    seen: list[dict[int, int]] = []
    q: PriorityQueue[Item] = PriorityQueue(limit=2, on_change=seen.append)
    a, b = Item("a", 0, 1), Item("b", 1, 2)
    q.put(a)
    q.put(b)
    with pytest.raises(QueueFull):
        q.put(Item("c", 0, 3))
    assert q.remove(a)
    assert not q.remove(a)
    assert len(q) == 1
    assert q.depth_by_priority() == {0: 0, 1: 1}
    assert seen[-1] == {0: 0, 1: 1}
    assert drain(q) == ["b"]


def test_many_removals_keep_the_heap_small_and_the_order_right() -> None:
    q: PriorityQueue[Item] = PriorityQueue(limit=1000, aging_seconds=1000)
    items = [Item(str(i), i % 3, float(i)) for i in range(300)]
    for item in items:
        q.put(item)
    for item in items[:250]:
        q.remove(item)
    rest = items[250:]
    expected = [i.name for i in sorted(rest, key=lambda i: (-i.priority, i.arrival))]
    assert drain(q) == expected
