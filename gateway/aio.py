"""asyncio helpers shared by the failover and the upstream clients."""

from __future__ import annotations

import asyncio


async def end_task(task: asyncio.Future) -> None:
    """Cancel `task` if it still runs and wait until it has ended, its outcome retrieved: a
    generator it was advancing can then be closed, and no failure of it is reported as unretrieved
    (a report that runs Python code in a finalizer, at whatever moment the collector picks)."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()
