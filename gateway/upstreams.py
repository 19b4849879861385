"""One small interface for an upstream, implemented for the edge (grpclib) and the core (Triton).

Routing and failover see only `Upstream`, so they treat edge and core alike and can be tested with
an in-process upstream. `UpstreamPool` holds every zone's upstreams and their health.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import Tier


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateCall:
    model: str
    prompt: str = ""
    # Chat requests send messages; the core applies the checkpoint's chat template.
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    # Tokens another zone already sent to the client: generation resumes after them.
    prefix_token_ids: tuple[int, ...] = ()
    traceparent: str | None = None


@dataclass(slots=True)
class GenerateChunk:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Upstream(Protocol):
    """A zone's edge worker or core, as the gateway talks to it."""

    zone: str
    tier: Tier

    async def embed(
        self, model: str, inputs: list[str], *, timeout: float, traceparent: str | None = None
    ) -> EmbedResult: ...

    def generate(self, call: GenerateCall, *, timeout: float) -> AsyncIterator[GenerateChunk]: ...

    async def health(self, *, timeout: float) -> bool: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Endpoint:
    """An upstream with what the gateway knows of its health."""

    upstream: Upstream
    healthy: bool = False
    last_checked: float = 0.0
    in_flight: int = 0

    @property
    def zone(self) -> str:
        return self.upstream.zone

    @property
    def tier(self) -> Tier:
        return self.upstream.tier


class UpstreamPool:
    """Every zone's upstreams, kept fresh by an active health check."""

    def __init__(self, upstreams: list[Upstream], *, interval: float, timeout: float = 1.0) -> None:
        self.endpoints = [Endpoint(u) for u in upstreams]
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task | None = None

    def for_tier(self, tier: Tier) -> list[Endpoint]:
        """The endpoints serving `tier`, in topology order."""
        return [e for e in self.endpoints if e.tier == tier]

    def all_healthy(self) -> bool:
        """Readiness: every endpoint answered its last health check."""
        return bool(self.endpoints) and all(e.healthy for e in self.endpoints)

    async def check_once(self) -> None:
        """Probe every endpoint concurrently and record the answers."""
        results = await asyncio.gather(
            *(e.upstream.health(timeout=self._timeout) for e in self.endpoints), return_exceptions=True
        )
        now = time.monotonic()
        for endpoint, ok in zip(self.endpoints, results):
            endpoint.healthy = ok is True
            endpoint.last_checked = now

    def start(self) -> None:
        """Run the health check loop in the background."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """Stop checking and close every upstream's connections."""
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(e.upstream.close() for e in self.endpoints), return_exceptions=True)
