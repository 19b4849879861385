"""The edge-local L1 cache: embeddings of inputs seen recently, by (model, input), least recently used out.

It sits in front of the batcher, so a repeated input costs a dictionary lookup instead of a model
call. Embeddings are deterministic, so an entry never goes stale while its model is loaded; the
gateway's L2 (Redis) cache is shared across workers, this one is per worker and in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CachedEmbedding:
    """One input's vector and the prompt tokens it took."""

    vector: np.ndarray  # float32 [dimension], read-only
    tokens: int


class L1Cache:
    """A bounded LRU map; used from the event loop only, so it needs no lock."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], CachedEmbedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, model: str, text: str) -> CachedEmbedding | None:
        """The cached embedding of `text` by `model`, marked as recently used; None on a miss."""
        entry = self._entries.get((model, text))
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end((model, text))
        self.hits += 1
        return entry

    def put(self, model: str, text: str, vector: np.ndarray, tokens: int) -> None:
        """Remember an embedding, evicting the least recently used entry when full."""
        if self.max_entries <= 0:
            return
        vector = np.array(vector, dtype=np.float32)  # a private copy: the batch array may be large
        vector.setflags(write=False)
        self._entries[(model, text)] = CachedEmbedding(vector, tokens)
        self._entries.move_to_end((model, text))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
