"""Dynamic batching and the L1 cache, with a fake model that records its calls (no ONNX needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edge.batcher import BatchPolicy, DynamicBatcher
from edge.embedder import Embedder
from edge.l1cache import L1Cache
from edge.runtime.embedding import EmbedResult


class _RecordingModel:
    """Embeds text as [len(text), ord(first char)] after `seconds`, recording every batch it sees."""

    def __init__(self, seconds: float = 0.0, fail_on: str | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> EmbedResult:
        with self._lock:
            self.calls.append(list(texts))
        time.sleep(self.seconds)
        if self.fail_on in texts:
            raise RuntimeError("model broke")
        vectors = np.array([[len(t), ord(t[0]) if t else 0] for t in texts], dtype=np.float32)
        return EmbedResult(vectors, sum(len(t) for t in texts), tuple(len(t) for t in texts))


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


async def test_concurrent_requests_share_model_calls_and_get_their_own_rows(executor) -> None:
    model = _RecordingModel(seconds=0.02)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=8, max_delay_s=0.005))
    texts = [[f"request {i}", f"x{i}"] for i in range(12)]
    results = await asyncio.gather(*(batcher.submit(t) for t in texts))
    for request, result in zip(texts, results):
        assert result.vectors[:, 0].tolist() == [len(t) for t in request]
        assert result.token_counts == tuple(len(t) for t in request)
        assert result.prompt_tokens == sum(len(t) for t in request)
    assert len(model.calls) < len(texts)
    assert max(len(c) for c in model.calls) <= 8


async def test_a_lone_request_waits_at_most_the_queue_delay(executor) -> None:
    model = _RecordingModel()
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=64, max_delay_s=0.05))
    started = time.perf_counter()
    await batcher.submit(["alone"])
    waited = time.perf_counter() - started
    assert 0.04 <= waited < 0.5


async def test_a_full_batch_leaves_without_waiting(executor) -> None:
    model = _RecordingModel()
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=4, max_delay_s=5.0))
    started = time.perf_counter()
    await batcher.submit(["a", "b", "c", "d"])
    assert time.perf_counter() - started < 1.0


async def test_max_batch_one_runs_one_request_at_a_time(executor) -> None:
    model = _RecordingModel(seconds=0.005)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=1, max_delay_s=0.0))
    await asyncio.gather(*(batcher.submit([f"t{i}"]) for i in range(6)))
    assert [len(c) for c in model.calls] == [1] * 6


async def test_oversized_request_runs_alone_and_whole(executor) -> None:
    model = _RecordingModel()
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=2, max_delay_s=0.001))
    result = await batcher.submit(["a", "bb", "ccc", "dddd"])
    assert result.vectors[:, 0].tolist() == [1, 2, 3, 4]
    assert model.calls == [["a", "bb", "ccc", "dddd"]]


async def test_a_failing_batch_fails_its_requests_and_the_next_batch_works(executor) -> None:
    model = _RecordingModel(fail_on="boom")
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=8, max_delay_s=0.01))
    outcomes = await asyncio.gather(batcher.submit(["boom"]), batcher.submit(["fine"]), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert (await batcher.submit(["later"])).vectors.shape == (1, 2)


async def test_a_cancelled_request_is_left_out_of_its_batch(executor) -> None:
    model = _RecordingModel(seconds=0.05)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=1, max_delay_s=0.0))
    first = asyncio.create_task(batcher.submit(["first"]))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(batcher.submit(["gone"]))
    await asyncio.sleep(0.005)
    gone.cancel()
    await first
    await batcher.submit(["third"])
    assert ["gone"] not in model.calls


def test_l1_cache_evicts_the_least_recently_used() -> None:
    cache = L1Cache(2)
    cache.put("m", "a", np.ones(2), 1)
    cache.put("m", "b", np.ones(2), 1)
    assert cache.get("m", "a") is not None  # "a" is now the most recent
    cache.put("m", "c", np.ones(2), 1)
    assert cache.get("m", "b") is None and cache.get("m", "a") is not None and len(cache) == 2
    assert cache.get("other-model", "a") is None  # keyed by model too
    assert (cache.hits, cache.misses) == (2, 2)


def test_l1_cache_of_size_zero_keeps_nothing() -> None:
    cache = L1Cache(0)
    cache.put("m", "a", np.ones(2), 1)
    assert cache.get("m", "a") is None and len(cache) == 0


async def test_embedder_answers_repeats_from_the_cache_in_input_order(executor) -> None:
    model = _RecordingModel()
    embedder = Embedder(executor, BatchPolicy(max_batch=8, max_delay_s=0.001), L1Cache(100))
    first = await embedder.embed("m", model, ["hello", "hi", "hello"])
    assert model.calls == [["hello", "hi"]]  # a repeat inside one request is embedded once
    second = await embedder.embed("m", model, ["hi", "new", "hello"])
    assert model.calls[-1] == ["new"]
    assert second.vectors[:, 0].tolist() == [2, 3, 5]
    assert first.prompt_tokens == 12 and second.token_counts == (2, 3, 5)
