"""The in-process L1 in front of the Redis L2: answers seen a moment ago, kept for a few seconds.

A hit in Redis costs a round trip; under load that was about a third of a cache hit's CPU. The L1
holds the same entries under the same keys, and the key already names the tenant, so one tenant's
entry is never another's. It is bounded in entries and in bytes (least recently used out first)
and keeps an entry for `ttl_s` at most, and never longer than Redis still keeps it, so it never
answers with what Redis has already forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class L1Cache(Generic[V]):
    """A bounded, expiring LRU map from cache key to answer."""

    def __init__(self, entries: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries = entries
        self._max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[V, int, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        """The answer under `key`, if it is still fresh."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[2] <= self._clock():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: V, size: int, ttl_s: float) -> None:
        """Keep `value` for `ttl_s` (capped at this cache's own TTL); `size` counts towards the bound."""
        ttl_s = min(ttl_s, self.ttl_s)
        if ttl_s <= 0 or size > self._max_bytes:
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (value, size, self._clock() + ttl_s)
        self._bytes += size
        while len(self._items) > self._entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        self._bytes -= self._items.pop(key)[1]
