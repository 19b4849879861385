"""The edge worker as an Upstream: meridian.edge.v1 over gRPC (grpclib)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
from grpclib import GRPCError, Status
from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from edge.api import edge_pb2
from edge.api.edge_grpc import EdgeStub
from gateway.coalescer import Coalescer, EmbedReply
from gateway.config import Tier
from gateway.errors import CONTEXT_LENGTH_EXCEEDED, GatewayError, Kind, UpstreamFailure
from gateway.outliers import DEFAULT_POLICY, EjectionPolicy
from gateway.replicas import ReplicatedUpstream, Resolver, resolve
from gateway.upstreams import EmbedResult, GenerateCall, GenerateChunk

# Refusals of the request itself: another zone would refuse it too. (kind, OpenAI error code)
_CLIENT_ERRORS = {
    Status.INVALID_ARGUMENT: (Kind.BAD_REQUEST, None),
    Status.NOT_FOUND: (Kind.NOT_FOUND, None),
    Status.OUT_OF_RANGE: (Kind.BAD_REQUEST, CONTEXT_LENGTH_EXCEEDED),  # the prompt does not fit the context
    Status.FAILED_PRECONDITION: (Kind.BAD_REQUEST, None),
}


class EdgeChannel:
    """One edge worker's address: its gRPC channel, and the RPCs that share it."""

    def __init__(self, host: str, port: int, *, max_in_flight: int, max_inputs: int) -> None:
        self._channel = Channel(host, port)
        self._stub = EdgeStub(self._channel)
        self._health = HealthStub(self._channel)
        self.coalescer = Coalescer(self._embed_rpc, max_inputs=max_inputs, max_in_flight=max_in_flight)
        self.closed = False

    async def embed(
        self, model: str, inputs: list[str], *, timeout: float, traceparent: str | None = None
    ) -> EmbedResult:
        """Embed `inputs` with `model` (in one RPC with other requests, under load)."""
        return await self.coalescer.embed(model, inputs, timeout=timeout, traceparent=traceparent)

    async def _embed_rpc(self, model: str, inputs: list[str], timeout: float, traceparent: str | None) -> EmbedReply:
        request = edge_pb2.EmbedRequest(model=model, inputs=inputs)
        metadata = {"traceparent": traceparent} if traceparent else None
        try:
            reply = await self._stub.Embed(request, timeout=timeout, metadata=metadata)
        except Exception as exc:
            raise _classify(exc) from exc
        if len(reply.embeddings) != len(inputs):
            raise UpstreamFailure(f"edge answered {len(reply.embeddings)} vectors for {len(inputs)} inputs")
        vectors = np.stack([_floats(e) for e in reply.embeddings]) if inputs else np.zeros((0, 0), np.float32)
        return EmbedReply(vectors, reply.prompt_tokens, tuple(reply.token_counts))

    async def generate(self, call: GenerateCall, *, timeout: float) -> AsyncIterator[GenerateChunk]:
        """Stream generated text from the edge's small LM."""
        request = edge_pb2.GenerateRequest(
            model=call.model,
            prompt=call.prompt,
            max_tokens=call.max_tokens or 0,
            fit_context=call.fit_context,
            temperature=call.temperature,
            top_p=call.top_p,
            stop=list(call.stop),
            prefix_token_ids=list(call.prefix_token_ids),
            # A chat goes as its messages: the edge renders them with the model's own chat template.
            messages=[edge_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in call.messages or ()],
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
        except Exception as exc:
            raise _classify(exc) from exc

    async def health(self, *, timeout: float) -> bool:
        """grpc.health.v1: SERVING for the whole server (raises when the worker does not answer)."""
        reply = await self._health.Check(HealthCheckRequest(service=""), timeout=timeout)
        return reply.status == HealthCheckResponse.SERVING

    async def close(self) -> None:
        """Close the channel."""
        self.closed = True
        self._channel.close()


class EdgeUpstream(ReplicatedUpstream[EdgeChannel]):
    """One zone's edge: every worker its name resolves to, balanced per request (`gateway/replicas.py`)."""

    tier: Tier = "edge"

    def __init__(
        self,
        zone: str,
        host: str,
        port: int,
        *,
        max_in_flight: int = 2,
        max_inputs: int = 64,
        resolve_interval_s: float = 5.0,
        resolver: Resolver = resolve,
        ejection: EjectionPolicy = DEFAULT_POLICY,
    ) -> None:
        super().__init__(
            zone, host, port, lambda h, p: EdgeChannel(h, p, max_in_flight=max_in_flight, max_inputs=max_inputs),
            resolve_interval_s=resolve_interval_s, resolver=resolver, ejection=ejection,
        )

    @property
    def rpcs(self) -> int:
        """Embed RPCs sent through the zone's current replicas."""
        return sum(r.conn.coalescer.rpcs for r in self.replicas.replicas)

    async def embed(
        self, model: str, inputs: list[str], *, timeout: float, traceparent: str | None = None
    ) -> EmbedResult:
        """Embed `inputs` with `model` on one of this zone's edge workers."""
        return await self.replicas.call(lambda ch: ch.embed(model, inputs, timeout=timeout, traceparent=traceparent))


def _floats(embedding: edge_pb2.Embedding) -> np.ndarray:
    """An embedding's values as float32, read from their packed wire form.

    Reading `values` makes one Python float per number (about 18 us a vector); protobuf
    serialises proto3 repeated floats packed (tag, length, little-endian floats), which numpy
    reads as they are (about 2 us).
    """
    raw = embedding.SerializeToString()
    if not raw or raw[0] != 0x0A:  # empty, or not the packed form: take the slow road
        return np.array(embedding.values, dtype=np.float32)
    size, shift, i = 0, 0, 1
    while True:
        byte = raw[i]
        size |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    return np.frombuffer(raw, dtype="<f4", offset=i, count=size // 4)


def _classify(exc: BaseException) -> Exception:
    if isinstance(exc, GRPCError):
        refusal = _CLIENT_ERRORS.get(exc.status)
        if refusal is not None:
            kind, code = refusal
            return GatewayError(kind, exc.message or exc.status.name, code=code)
        if exc.status == Status.DEADLINE_EXCEEDED:
            return UpstreamFailure(f"edge timed out: {exc.message}", timeout=True)
        if exc.status == Status.UNAVAILABLE:  # draining or loading: it did none of the work
            return UpstreamFailure(f"edge refused: {exc.message or 'unavailable'}", refused=True)
        return UpstreamFailure(f"edge failed: {exc.status.name} {exc.message or ''}".strip())
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure("edge timed out", timeout=True)
    if isinstance(exc, (OSError, StreamTerminatedError, ConnectionError)):
        return UpstreamFailure(f"edge unreachable: {exc}", hard=True)
    return UpstreamFailure(f"edge call failed: {type(exc).__name__}: {exc}")
