"""asyncio helpers shared by the failover and the upstream clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
WATCH_S = 0.05  # how often a wait for a stream's next item looks at what it watches


async def end_task(task: asyncio.Future) -> None:
    """Cancel `task` if it still runs and wait until it has ended, its outcome retrieved: a
    generator it was advancing can then be closed, and no failure of it is reported as unretrieved
    (a report that runs Python code in a finalizer, at whatever moment the collector picks)."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


async def next_watched(
    items: AsyncIterator[T], stop: Callable[[], BaseException | None], *, timeout: float | None = None
) -> T:
    """The next item of `items`, unless `stop()`, asked every WATCH_S while waiting, returns an
    error (raised) or `timeout` passes (`TimeoutError`). A silent upstream keeps its connection
    open: the health checks notice it well before a per-item timeout would. `StopAsyncIteration`
    passes through."""
    return await watched(anext(items), stop, timeout=timeout)


async def watched(
    awaitable: Awaitable[T], stop: Callable[[], BaseException | None], *, timeout: float | None = None
) -> T:
    """What `awaitable` returns, unless `stop()`, asked every WATCH_S while waiting, returns an
    error (raised) or `timeout` passes (`TimeoutError`). The abandoned wait is ended (`end_task`)
    before this returns."""
    pending = asyncio.ensure_future(awaitable)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            wait = WATCH_S if deadline is None else min(WATCH_S, max(0.0, deadline - time.monotonic()))
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if done:
                return pending.result()
            error = stop()
            if error is not None:
                raise error
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
    finally:
        await end_task(pending)
