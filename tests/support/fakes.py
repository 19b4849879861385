"""In-process upstreams for unit tests of the gateway's pure logic (never used in integration tests)."""

from __future__ import annotations

import asyncio

from gateway.errors import UpstreamFailure
from gateway.upstreams import EmbedResult, GenerateCall, GenerateChunk


class FakeUpstream:
    """An in-process upstream: scripted answers and failures."""

    serving_replicas = 1
    replica_moves = 0
    replica_ejections = 0

    def __init__(self, zone: str, tier: str, *, fail: bool = False, fail_after: int | None = None) -> None:
        self.zone, self.tier = zone, tier
        self.fail = fail
        self.fail_after = fail_after
        self.calls: list[GenerateCall] = []
        self.embed_calls = 0
        self.delay = 0.0
        self.silent = False  # health checks get no answer at all (a blackholed zone)
        self.health_delay = 0.0  # a health check's round trip
        self.health_checks = 0

    async def embed(self, model, inputs, *, timeout, traceparent=None):
        self.traceparent = traceparent
        self.embed_calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise UpstreamFailure("down")
        return EmbedResult([[float(len(t)), 0.0, 1.0] for t in inputs], sum(len(t) for t in inputs))

    async def generate(self, call, *, timeout):
        self.calls.append(call)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise UpstreamFailure("down")
        start = len(call.prefix_token_ids)
        total = 6
        for i in range(start, total):
            if self.fail_after is not None and i >= self.fail_after:
                raise UpstreamFailure("zone died mid-stream")
            last = i == total - 1
            yield GenerateChunk(f"t{i} ", [i], "length" if last else None, 3, i + 1)

    async def health(self, *, timeout):
        self.health_checks += 1
        if self.silent:
            await asyncio.Event().wait()
        await asyncio.sleep(self.health_delay)
        return not self.fail

    async def close(self):
        pass


class SlowCore(FakeUpstream):
    """A core that streams `chunks` pieces, one per 100 ms, and notes whether its stream was closed early."""

    def __init__(self, chunks: int = 50) -> None:
        super().__init__("zone-a", "core")
        self.chunks = chunks
        self.sent, self.closed_early = 0, asyncio.Event()

    async def generate(self, call, *, timeout):
        try:
            for i in range(self.chunks):
                await asyncio.sleep(0.1)
                self.sent += 1
                yield GenerateChunk(f"t{i} ", [i], "length" if i == self.chunks - 1 else None, 3, i + 1)
        finally:
            if self.sent < self.chunks:
                self.closed_early.set()
