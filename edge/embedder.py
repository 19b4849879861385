"""The worker's embedding path: the L1 cache first, then one dynamic batcher per model for the misses."""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from edge.batcher import BatchPolicy, DynamicBatcher
from edge.l1cache import L1Cache
from edge.runtime.embedding import EmbeddingModel, EmbedResult


class Embedder:
    """Answers embedding requests from the cache where it can and batches the rest."""

    def __init__(self, executor: Executor, policy: BatchPolicy, cache: L1Cache) -> None:
        self.executor = executor
        self.policy = policy
        self.cache = cache
        self._batchers: dict[str, DynamicBatcher] = {}

    async def embed(self, name: str, model: EmbeddingModel, texts: list[str]) -> EmbedResult:
        """Embeddings of `texts` by the model served as `name`, in input order."""
        found = {t: self.cache.get(name, t) for t in dict.fromkeys(texts)}
        missing = [t for t, entry in found.items() if entry is None]  # each distinct input once
        fresh: dict[str, tuple[np.ndarray, int]] = {}
        if missing:
            result = await self._batcher(name, model).submit(missing)
            for i, text in enumerate(missing):
                tokens = result.token_counts[i] if result.token_counts else 0
                fresh[text] = (result.vectors[i], tokens)
                self.cache.put(name, text, result.vectors[i], tokens)
            if len(missing) == len(texts) == len(result.token_counts):  # no hits, no repeats: as it came
                return result
        rows, counts = [], []
        for text in texts:
            entry = found[text]
            vector, tokens = (entry.vector, entry.tokens) if entry is not None else fresh[text]
            rows.append(vector)
            counts.append(tokens)
        return EmbedResult(np.stack(rows).astype(np.float32, copy=False), sum(counts), tuple(counts))

    async def close(self) -> None:
        """Stop every batcher (requests still queued fail as cancelled)."""
        for batcher in self._batchers.values():
            await batcher.close()

    def _batcher(self, name: str, model: EmbeddingModel) -> DynamicBatcher:
        """The batcher of the model served as `name`, made on first use."""
        batcher = self._batchers.get(name)
        if batcher is None:
            batcher = self._batchers[name] = DynamicBatcher(model.embed, self.executor, self.policy)
        return batcher
