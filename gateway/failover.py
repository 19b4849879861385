"""Retrying in the next zone: unary calls, and generation streams resumed from the tokens sent.

A request moves to another zone only when nothing has reached the client yet, or when the engine
can resume it: a stream continues in the next zone from the prompt plus the tokens already sent,
with the same seed, so the client sees one unbroken stream.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from gateway.errors import GatewayError, Kind, UpstreamFailure
from gateway.upstreams import Endpoint, GenerateCall, GenerateChunk

T = TypeVar("T")
log = logging.getLogger("meridian.gateway.failover")


def _usable(endpoints: list[Endpoint]) -> list[Endpoint]:
    healthy = [e for e in endpoints if e.healthy]
    if not healthy:
        raise GatewayError(Kind.NO_HEALTHY_ZONE, "no healthy zone can serve this request", code="no_healthy_zone")
    return healthy


def _exhausted(last: UpstreamFailure | None) -> GatewayError:
    if last is not None and last.timeout:
        return GatewayError(Kind.UPSTREAM_TIMEOUT, f"every zone timed out ({last})", code="upstream_timeout")
    return GatewayError(Kind.NO_HEALTHY_ZONE, f"every zone failed ({last})", code="upstream_unavailable")


def _eject(endpoint: Endpoint, failure: UpstreamFailure) -> None:
    # Passive health: stop sending here until the active check sees it answer again.
    endpoint.healthy = False
    log.warning("upstream failed", extra={"zone": endpoint.zone, "tier": endpoint.tier, "error": str(failure)})


async def call_unary(endpoints: list[Endpoint], call: Callable[[Endpoint], Awaitable[T]]) -> tuple[Endpoint, T]:
    """Run `call` on the first endpoint that answers; a retryable failure moves to the next."""
    last: UpstreamFailure | None = None
    for endpoint in _usable(endpoints):
        endpoint.in_flight += 1
        try:
            return endpoint, await call(endpoint)
        except UpstreamFailure as failure:
            if not failure.retryable:
                raise GatewayError(Kind.UPSTREAM, str(failure)) from failure
            last = failure
            _eject(endpoint, failure)
        finally:
            endpoint.in_flight -= 1
    raise _exhausted(last)


class ResumableStream:
    """A generation stream that survives the loss of a zone.

    `first_zone` is known once `start()` returned, before any chunk reaches the client.
    """

    def __init__(self, endpoints: list[Endpoint], call: GenerateCall, timeout: float) -> None:
        self._queue = _usable(endpoints)
        self._call = call
        self._timeout = timeout
        self._tokens: list[int] = []
        self._first: GenerateChunk | None = None
        self._current: AsyncIterator[GenerateChunk] | None = None
        self.first_zone: str = ""
        self.resumed = 0

    async def start(self) -> None:
        """Open the stream in the first zone that yields a chunk."""
        self._first = await self._open()

    async def _open(self) -> GenerateChunk:
        last: UpstreamFailure | None = None
        while self._queue:
            endpoint = self._queue.pop(0)
            call = self._call
            if self._tokens:
                call = dataclasses.replace(
                    call,
                    prefix_token_ids=call.prefix_token_ids + tuple(self._tokens),
                    max_tokens=None if call.max_tokens is None else call.max_tokens - len(self._tokens),
                )
            stream = endpoint.upstream.generate(call, timeout=self._timeout)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                last = UpstreamFailure("stream ended before its first chunk")
                _eject(endpoint, last)
                continue
            except UpstreamFailure as failure:
                if not failure.retryable:
                    raise GatewayError(Kind.UPSTREAM, str(failure)) from failure
                last = failure
                _eject(endpoint, failure)
                continue
            self._current = stream
            self.first_zone = self.first_zone or endpoint.zone
            return first
        raise _exhausted(last)

    async def chunks(self) -> AsyncIterator[GenerateChunk]:
        """Every chunk of the generation; a failed zone hands over to the next mid-stream."""
        chunk = self._first
        assert chunk is not None, "start() first"
        while True:
            self._tokens.extend(chunk.token_ids)
            yield chunk
            if chunk.finish_reason:
                return
            try:
                chunk = await anext(self._current)
            except StopAsyncIteration:
                chunk = None
                failure = UpstreamFailure("stream ended without a finish reason")
            except UpstreamFailure as exc:
                chunk, failure = None, exc
            if chunk is None:
                log.warning("resuming stream in the next zone", extra={"error": str(failure)})
                self.resumed += 1
                chunk = await self._open()

    async def aclose(self) -> None:
        """Close the upstream stream (cancels the generation when the client went away)."""
        if self._current is not None:
            await self._current.aclose()
