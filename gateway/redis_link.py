"""The gateway's one Redis connection pool, with a breaker so a dead Redis costs nothing per request.

Callers use `run(op)`: it returns the operation's result, or raises `RedisDown` at once while the
breaker is open. The cache turns that into a bypass and the limiter into its local fallback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.config import RedisConfig
from gateway.resp import RespClient, RespConnectionError, RespError

T = TypeVar("T")
log = logging.getLogger("meridian.gateway.redis")


class RedisDown(Exception):
    """Redis is unreachable (or was a moment ago)."""


class RedisLink:
    """A Redis client that fails fast and probes again after a pause."""

    def __init__(self, config: RedisConfig, *, retry_after: float = 1.0) -> None:
        self.client = RespClient(config.host, config.port, config.db, timeout=config.timeout_s)
        self._retry_after = retry_after
        self._open_until = 0.0

    @property
    def available(self) -> bool:
        """False while the breaker is open."""
        return time.monotonic() >= self._open_until

    async def run(self, op: Callable[[RespClient], Awaitable[T]]) -> T:
        """Run `op` against Redis; RedisDown when it cannot."""
        if not self.available:
            raise RedisDown("redis unavailable")
        try:
            return await op(self.client)
        except (RespConnectionError, RespError, OSError) as exc:
            if self.available:
                log.warning("redis unreachable; bypassing", extra={"error": str(exc)})
            self._open_until = time.monotonic() + self._retry_after
            raise RedisDown(str(exc)) from exc

    async def close(self) -> None:
        """Close the pool."""
        await self.client.aclose()
