"""Dynamic batching for embeddings: requests that arrive together share one model call.

Requests queue on the event loop. A batch leaves when it holds `max_batch` inputs or when its oldest
request has waited `max_delay_s`, whichever comes first; while every inference thread is busy the
queue simply grows, so under load batches fill without any waiting. Requests are never split: one
larger than `max_batch` runs as a batch of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from edge.runtime.embedding import EmbedResult


@dataclass(frozen=True)
class BatchPolicy:
    """How requests are grouped (from the topology: max batch size and max queue delay)."""

    max_batch: int = 32
    max_delay_s: float = 0.002
    concurrency: int = 1  # batches running at once (the inference threads)


@dataclass
class _Pending:
    """One request waiting for its batch."""

    texts: list[str]
    future: asyncio.Future[EmbedResult]
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Groups `submit` calls into `embed` calls run on `executor`."""

    def __init__(self, embed: Callable[[list[str]], EmbedResult], executor: Executor, policy: BatchPolicy) -> None:
        self.embed = embed
        self.executor = executor
        self.policy = policy
        self._queue: deque[_Pending] = deque()
        self._queued_inputs = 0
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max(1, policy.concurrency))
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # model calls made, for tests and logs

    async def submit(self, texts: list[str]) -> EmbedResult:
        """Embed `texts` as part of the next batch."""
        pending = _Pending(list(texts), asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_inputs += len(pending.texts)
        self._arrived.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch(), name="edge-batcher")
        return await pending.future

    async def close(self) -> None:
        """Stop dispatching; requests still queued fail as cancelled."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for pending in self._queue:
            pending.future.cancel()
        self._queue.clear()
        self._queued_inputs = 0

    async def _dispatch(self) -> None:
        """Form batches for as long as requests keep coming."""
        while self._queue:
            await self._slots.acquire()
            try:
                await self._fill()
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _fill(self) -> None:
        """Wait until the queue holds a full batch or its oldest request is due."""
        while self._queue and self._queued_inputs < self.policy.max_batch:
            due = self._queue[0].enqueued + self.policy.max_delay_s - time.monotonic()
            if due <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), due)
            except asyncio.TimeoutError:
                return

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

    async def _run(self, batch: list[_Pending]) -> None:
        """One model call for the batch, its rows handed back to each request in order."""
        texts = [t for pending in batch for t in pending.texts]
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, self.embed, texts)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        self.batches += 1
        start = 0
        for pending in batch:
            end = start + len(pending.texts)
            counts = result.token_counts[start:end]
            if not pending.future.done():
                pending.future.set_result(EmbedResult(result.vectors[start:end], sum(counts), counts))
            start = end
