"""The edge worker as an Upstream: meridian.edge.v1 over gRPC (grpclib)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpclib import GRPCError, Status
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from edge.api import edge_pb2
from edge.api.edge_grpc import EdgeStub
from gateway.config import Tier
from gateway.errors import GatewayError, Kind, UpstreamFailure
from gateway.upstreams import EmbedResult, GenerateCall, GenerateChunk

# Refusals of the request itself: another zone would refuse it too.
_CLIENT_ERRORS = {
    Status.INVALID_ARGUMENT: Kind.BAD_REQUEST,
    Status.NOT_FOUND: Kind.NOT_FOUND,
    Status.OUT_OF_RANGE: Kind.BAD_REQUEST,
    Status.FAILED_PRECONDITION: Kind.BAD_REQUEST,
}


class EdgeUpstream:
    """One zone's edge worker."""

    tier: Tier = "edge"

    def __init__(self, zone: str, host: str, port: int) -> None:
        self.zone = zone
        self._channel = Channel(host, port)
        self._stub = EdgeStub(self._channel)
        self._health = HealthStub(self._channel)

    async def embed(
        self, model: str, inputs: list[str], *, timeout: float, traceparent: str | None = None
    ) -> EmbedResult:
        """Embed `inputs` with `model` on this edge."""
        request = edge_pb2.EmbedRequest(model=model, inputs=inputs)
        metadata = {"traceparent": traceparent} if traceparent else None
        try:
            reply = await self._stub.Embed(request, timeout=timeout, metadata=metadata)
        except Exception as exc:  # noqa: BLE001 - every transport failure is classified below
            raise _classify(exc) from exc
        return EmbedResult([list(e.values) for e in reply.embeddings], reply.prompt_tokens)

    async def generate(self, call: GenerateCall, *, timeout: float) -> AsyncIterator[GenerateChunk]:
        """Stream generated text from the edge's small LM."""
        request = edge_pb2.GenerateRequest(
            model=call.model,
            prompt=call.prompt,
            max_tokens=call.max_tokens or 0,
            temperature=call.temperature,
            top_p=call.top_p,
            stop=list(call.stop),
            prefix_token_ids=list(call.prefix_token_ids),
        )
        if call.seed is not None:
            request.seed = call.seed
        metadata = {"traceparent": call.traceparent} if call.traceparent else None
        try:
            async with self._stub.Generate.open(timeout=timeout, metadata=metadata) as stream:
                await stream.send_message(request, end=True)
                async for chunk in stream:
                    yield GenerateChunk(
                        chunk.text,
                        list(chunk.token_ids),
                        chunk.finish_reason or None,
                        chunk.prompt_tokens,
                        chunk.completion_tokens,
                    )
        except (GatewayError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001
            raise _classify(exc) from exc

    async def health(self, *, timeout: float) -> bool:
        """grpc.health.v1: SERVING for the whole server."""
        try:
            reply = await self._health.Check(HealthCheckRequest(service=""), timeout=timeout)
        except Exception:  # noqa: BLE001 - any failure means not healthy
            return False
        return reply.status == HealthCheckResponse.SERVING

    async def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def _classify(exc: BaseException) -> Exception:
    if isinstance(exc, GRPCError):
        kind = _CLIENT_ERRORS.get(exc.status)
        if kind is not None:
            return GatewayError(kind, exc.message or exc.status.name)
        if exc.status == Status.DEADLINE_EXCEEDED:
            return UpstreamFailure(f"edge timed out: {exc.message}", timeout=True)
        return UpstreamFailure(f"edge failed: {exc.status.name} {exc.message or ''}".strip())
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure("edge timed out", timeout=True)
    if isinstance(exc, (OSError, StreamTerminatedError, ConnectionError)):
        return UpstreamFailure(f"edge unreachable: {exc}", hard=True)
    return UpstreamFailure(f"edge call failed: {type(exc).__name__}: {exc}")
