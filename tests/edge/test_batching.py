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


async def test_a_lone_request_is_not_delayed_by_the_queue_delay(executor) -> None:
    model = _RecordingModel()
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=64, max_delay_s=0.5))
    for text in ("first", "second", "third"):  # one caller after another: never any company to wait for
        started = time.perf_counter()
        await batcher.submit([text])
        assert time.perf_counter() - started < 0.25
    assert model.calls == [["first"], ["second"], ["third"]]


async def test_requests_that_queue_while_a_batch_runs_leave_together_without_waiting(executor) -> None:
    model = _RecordingModel(seconds=0.05)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=64, max_delay_s=5.0))
    first = asyncio.create_task(batcher.submit(["first"]))
    await asyncio.sleep(0.01)  # "first" is running now; these queue behind it
    started = time.perf_counter()
    await asyncio.gather(*(batcher.submit([f"queued {i}"]) for i in range(5)), first)
    assert model.calls == [["first"], [f"queued {i}" for i in range(5)]]
    # They left when the thread came free: no 5 s wait for a fuller batch.
    assert time.perf_counter() - started < 1.0


async def test_batches_keep_forming_under_closed_loop_load(executor) -> None:
    model = _RecordingModel(seconds=0.005)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=8, max_delay_s=0.002))

    async def client(index: int) -> None:
        for call in range(10):
            result = await batcher.submit([f"client {index} call {call}"])
            assert result.vectors[0, 0] == len(f"client {index} call {call}")

    await asyncio.gather(*(client(i) for i in range(16)))
    assert sum(len(c) for c in model.calls) == 160
    assert max(len(c) for c in model.calls) <= 8
    assert len(model.calls) <= 160 / 4  # 16 callers on one thread: batches of 4 or more on average


async def test_under_load_a_freed_thread_waits_for_the_last_batchs_callers(executor) -> None:
    model = _RecordingModel(seconds=0.02)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=64, max_delay_s=0.2))
    blocker = asyncio.create_task(batcher.submit(["blocker"]))
    await asyncio.sleep(0.005)
    await asyncio.gather(*(batcher.submit([f"wave {i}"]) for i in range(4)), blocker)  # a batch of 4 ran
    assert model.calls[-1] == [f"wave {i}" for i in range(4)]

    async def late(i: int) -> None:  # the same 4 callers come back one by one
        await asyncio.sleep(0.01 * i)
        await batcher.submit([f"again {i}"])

    await asyncio.gather(*(late(i) for i in range(4)))
    assert model.calls[-1] == [f"again {i}" for i in range(4)]  # one batch, not 1 + 3


async def test_a_wait_for_company_that_does_not_come_is_bounded_and_not_repeated(executor) -> None:
    model = _RecordingModel(seconds=0.02)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=64, max_delay_s=0.1))
    blocker = asyncio.create_task(batcher.submit(["blocker"]))
    await asyncio.sleep(0.005)
    await asyncio.gather(*(batcher.submit([f"wave {i}"]) for i in range(4)), blocker)
    started = time.perf_counter()
    await batcher.submit(["only one came back"])
    waited = time.perf_counter() - started
    assert 0.08 <= waited < 0.5  # it waited for the others, but no longer than the queue delay
    started = time.perf_counter()
    await batcher.submit(["quiet again"])
    assert time.perf_counter() - started < 0.08  # no load any more: no wait


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


async def test_an_oversized_request_runs_in_pieces_with_others_in_between(executor) -> None:
    model = _RecordingModel(seconds=0.02)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=2, max_delay_s=0.0))
    big = asyncio.create_task(batcher.submit(["a", "bb", "ccc", "dddd", "eeeee"]))
    await asyncio.sleep(0.005)  # the first piece runs
    small = await batcher.submit(["x"])
    result = await big
    assert result.vectors[:, 0].tolist() == [1, 2, 3, 4, 5]
    assert result.token_counts == (1, 2, 3, 4, 5) and result.prompt_tokens == 15
    assert small.vectors[:, 0].tolist() == [1]
    assert model.calls == [["a", "bb"], ["x"], ["ccc", "dddd"], ["eeeee"]]


async def test_a_caller_that_gives_up_leaves_the_rest_of_its_pieces_unrun(executor) -> None:
    model = _RecordingModel(seconds=0.05)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=2, max_delay_s=0.0))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(batcher.submit([f"t{i}" for i in range(10)]), 0.07)  # a deadline
    await asyncio.sleep(0.1)
    assert (await batcher.submit(["next"])).vectors.shape == (1, 2)
    assert len(model.calls) <= 3 and model.calls[-1] == ["next"]


async def test_a_failing_batch_fails_its_requests_and_the_next_batch_works(executor) -> None:
    model = _RecordingModel(seconds=0.02, fail_on="boom")
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=8, max_delay_s=0.01))
    blocker = asyncio.create_task(batcher.submit(["blocker"]))
    await asyncio.sleep(0.005)  # "boom" and "fine" queue together behind the blocker
    outcomes = await asyncio.gather(batcher.submit(["boom"]), batcher.submit(["fine"]), return_exceptions=True)
    await blocker
    assert model.calls[1] == ["boom", "fine"]
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


async def test_close_cancels_queued_requests_and_refuses_new_ones(executor) -> None:
    model = _RecordingModel(seconds=0.05)
    batcher = DynamicBatcher(model.embed, executor, BatchPolicy(max_batch=8, max_delay_s=0.0))
    running = asyncio.create_task(batcher.submit(["running"]))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(batcher.submit(["queued"]))
    await asyncio.sleep(0)
    await batcher.close()
    assert (await running).vectors.shape == (1, 2)  # a batch already running still answers
    with pytest.raises(asyncio.CancelledError):
        await queued
    with pytest.raises(RuntimeError):
        await batcher.submit(["after close"])
    assert ["queued"] not in model.calls


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
