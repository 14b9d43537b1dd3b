"""A least-recently-used cache bounded by the size of what it holds, not by its count of entries.

The processor caches what it builds from a client's values (stop-sequence automata, schema validators), and a
client decides how large each one is: 64 entries of a few bytes and 64 entries of a megabyte are not the same
cache. Each entry here is charged its `cost` (a size in the caller's unit, proportional to its memory), and the
least recently used entries leave until the total fits the budget. An entry costing more than the whole budget is
built and used, never kept.

Thread-safe: large requests are prepared on a worker thread (`extproc.processors`) while the event loop prepares
small ones. The lock covers the bookkeeping, not `build`: two threads missing the same key both build it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SizedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedCache(Generic[K, V]):
    """`get(key)` the cached value, else `build(key)`, keeping it while the total cost stays within `budget`."""

    __slots__ = ("_build", "_cost", "_entries", "_lock", "_total", "budget")

    def __init__(self, build: Callable[[K], V], cost: Callable[[K], int], budget: int) -> None:
        self._build, self._cost, self.budget = build, cost, budget
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
        value = self._build(key)
        cost = self._cost(key)
        if cost > self.budget:
            return value
        with self._lock:
            if key in self._entries:  # another thread built it meanwhile: keep one, charged once
                return self._entries[key][0]
            self._entries[key] = (value, cost)
            self._total += cost
            while self._total > self.budget:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._total -= evicted
        return value

    @property
    def total(self) -> int:
        """The cost of what is held now (at most `budget`)."""
        return self._total

    def __len__(self) -> int:
        return len(self._entries)
