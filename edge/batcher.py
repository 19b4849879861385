"""Dynamic batching for embeddings: requests that arrive together share one model call.

A request that finds an inference thread idle on a quiet worker runs at once: nobody else is asking,
so waiting for company would only add latency. While every inference thread is busy, requests queue;
the moment one comes free it takes everything queued (whole requests, up to `max_batch` inputs) as
one call. Under load batches therefore fill by themselves, from what arrived while the last one ran.

`max_delay_s` is the only deliberate wait, and only under evident load: when a thread is free but
fewer requests are queued than the last batch held, the queue waits (at most `max_delay_s` from the
later of its first arrival and the thread coming free) for that many, because the last batch's
callers are then usually on their way back. Without it, closed-loop callers split into a big and a
tiny batch that alternate for good. A lone caller (last batch: one request) never waits, and a wait
that times out is not repeated until a batch of several requests has run again. The default is 0 (no
wait at all): on CPU workers the fragments cost nothing measurable, while merging a whole wave of
callers into one batch stops the event loop's work on one half overlapping the model's on the other.
A request larger than `max_batch` runs as consecutive pieces of `max_batch` inputs, each queued
when the one before it is done: what arrived meanwhile runs in between, so one huge request cannot
hold an inference thread for its whole length while others wait, and a caller that gives up (its
deadline passed) leaves its remaining pieces unrun.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from edge.runtime.embedding import EmbedResult


@dataclass(frozen=True)
class BatchPolicy:
    """How requests are grouped (from the topology: max batch size and max queue delay)."""

    max_batch: int = 32
    max_delay_s: float = 0.0  # see EdgeConfig.max_queue_delay_ms
    concurrency: int = 1  # batches running at once (the inference threads)


@dataclass
class _Pending:
    """One request waiting for its batch."""

    texts: list[str]
    future: asyncio.Future[EmbedResult]
    enqueued: float  # loop time


class DynamicBatcher:
    """Groups `submit` calls into `embed` calls run on `executor`.

    Driven by callbacks on the event loop (a submit, a finished batch, the delay timer) rather than by
    a task of its own, so that starting a batch costs no extra trip through the loop.
    """

    def __init__(self, embed: Callable[[list[str]], EmbedResult], executor: Executor, policy: BatchPolicy) -> None:
        self.embed = embed
        self.executor = executor
        self.policy = policy
        self._queue: deque[_Pending] = deque()
        self._queued_inputs = 0
        self._free = max(1, policy.concurrency)
        self._last_requests = 0  # requests in the batch started last: how much company to expect
        self._freed_at = 0.0  # loop time an inference thread last came free
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.batches = 0  # model calls made, for tests and logs
        self.sizes: deque[int] = deque(maxlen=256)  # requests per model call, most recent last, for tests

    async def submit(self, texts: list[str]) -> EmbedResult:
        """Embed `texts` alone if an inference thread is idle, else as part of the next batch (in
        pieces of `max_batch`, one after another, if it is larger)."""
        size = max(1, self.policy.max_batch)
        if len(texts) <= size:
            return await self._submit_one(texts)
        parts = [await self._submit_one(texts[i:i + size]) for i in range(0, len(texts), size)]
        return EmbedResult(np.concatenate([p.vectors for p in parts]), sum(p.prompt_tokens for p in parts),
                           tuple(c for p in parts for c in p.token_counts))

    async def _submit_one(self, texts: list[str]) -> EmbedResult:
        if self._closed:
            raise RuntimeError("batcher is closed")
        loop = asyncio.get_running_loop()
        pending = _Pending(list(texts), loop.create_future(), loop.time())
        self._queue.append(pending)
        self._queued_inputs += len(pending.texts)
        self._pump()
        return await pending.future

    async def close(self) -> None:
        """Stop starting batches; requests still queued fail as cancelled (running ones finish)."""
        self._closed = True
        self._cancel_timer()
        for pending in self._queue:
            pending.future.cancel()
        self._queue.clear()
        self._queued_inputs = 0

    def _pump(self) -> None:
        """Start batches while an inference thread is free and requests wait (or arm the delay timer)."""
        while self._free and self._queue and not self._closed:
            due = self._due()
            if due is not None:
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_at(due, self._on_timer)
                return
            self._cancel_timer()
            batch = self._take()
            if batch:
                self._start(batch)

    def _due(self) -> float | None:
        """When a queue still short of company should leave anyway (loop time); None to send it now."""
        if self.policy.max_delay_s <= 0 or self._queued_inputs >= self.policy.max_batch:
            return None
        if len(self._queue) >= self._last_requests:  # as many as last time (or no load at all): go
            return None
        due = max(self._queue[0].enqueued, self._freed_at) + self.policy.max_delay_s
        return due if due > asyncio.get_running_loop().time() else None

    def _on_timer(self) -> None:
        """The company did not come in time: send what there is."""
        self._timer = None
        self._last_requests = 0  # and do not wait again until a batch of several has run
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take(self) -> list[_Pending]:
        """Whole requests from the head of the queue, up to max_batch inputs (at least one request)."""
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if batch and size + len(head.texts) > self.policy.max_batch:
                break
            self._queue.popleft()
            self._queued_inputs -= len(head.texts)
            if head.future.cancelled():  # the caller went away while it waited
                continue
            batch.append(head)
            size += len(head.texts)
        return batch

    def _start(self, batch: list[_Pending]) -> None:
        """Run one model call for `batch` on an inference thread; `_finished` hands the rows back."""
        texts = [t for pending in batch for t in pending.texts]
        self._free -= 1
        self._last_requests = len(batch)
        self.sizes.append(len(batch))
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, self.embed, texts)
        except RuntimeError as exc:  # the executor is shut down: fail the batch, not the loop
            self._free += 1
            _fail(batch, exc)
            return
        future.add_done_callback(functools.partial(self._finished, batch))

    def _finished(self, batch: list[_Pending], future: asyncio.Future[EmbedResult]) -> None:
        """Give each request its rows (or the batch's error), then start the next batch."""
        self._free += 1
        self._freed_at = asyncio.get_running_loop().time()
        self.batches += 1
        if future.cancelled():
            for pending in batch:
                pending.future.cancel()
        elif (exc := future.exception()) is not None:
            _fail(batch, exc)  # every request of the batch gets the error
        else:
            _deliver(batch, future.result())
        self._pump()


def _deliver(batch: list[_Pending], result: EmbedResult) -> None:
    """Slice one batch's result back into its requests, in order."""
    start = 0
    for pending in batch:
        end = start + len(pending.texts)
        counts = result.token_counts[start:end]
        if not pending.future.done():
            pending.future.set_result(EmbedResult(result.vectors[start:end], sum(counts), counts))
        start = end


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    """Fail every request of `batch` that is still waiting."""
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
