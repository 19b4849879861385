"""The `meridian.edge.v1.Edge` gRPC service: validates requests and runs models off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus

from edge.api import edge_pb2
from edge.api.edge_grpc import EdgeBase
from edge.batcher import BatchPolicy
from edge.embedder import Embedder
from edge.errors import EdgeError, ErrorKind
from edge.l1cache import L1Cache
from edge.logs import elapsed_ms, get_logger
from edge.registry import ServedModel
from edge.runtime.generation import ContextOverflow, SmallLM
from edge.validation import (EmbedLimits, GenerateLimits, check_embed_inputs, check_generate, check_prompt,
                             pick_model)
from edge.wire import embed_response

if TYPE_CHECKING:
    from grpclib.server import Stream

# The one place where error kinds become gRPC status codes.
GRPC_STATUS = {
    ErrorKind.BAD_INPUT: Status.INVALID_ARGUMENT,
    ErrorKind.CONTEXT_OVERFLOW: Status.OUT_OF_RANGE,
    ErrorKind.UNKNOWN_MODEL: Status.NOT_FOUND,
    ErrorKind.UNAVAILABLE: Status.UNAVAILABLE,
    ErrorKind.UNIMPLEMENTED: Status.UNIMPLEMENTED,
}


class EdgeService(EdgeBase):
    """Serves Embed (cached, dynamically batched) and Generate (streamed) from loaded models.

    Embed answers in wire bytes made by `edge.wire`: serve it with `edge.wire.EncodedCodec`, as
    `EdgeServer` does."""

    def __init__(
        self,
        zone: str,
        limits: EmbedLimits,
        executor: Executor,
        *,
        embedder: Embedder | None = None,
        generate_limits: GenerateLimits | None = None,
    ) -> None:
        self.zone = zone
        self.limits = limits
        self.generate_limits = generate_limits or GenerateLimits()
        self.executor = executor
        self.embedder = embedder or Embedder(executor, BatchPolicy(), L1Cache(0))
        self.models: dict[str, ServedModel] = {}
        # What grpc.health.v1 reports for this service (and overall): NOT_SERVING until models load.
        self.health = ServiceStatus()
        self.health.set(False)
        self.accepting = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._log = get_logger()

    def ready(self, models: dict[str, ServedModel]) -> None:
        """Start answering with `models`, and report SERVING."""
        self.models = models
        self.accepting = True
        self.health.set(True)

    def begin_drain(self, *, refuse_new: bool = True) -> None:
        """Report NOT_SERVING; refuse new requests too unless `refuse_new` is False. Running ones carry on."""
        self.health.set(False)
        if refuse_new:
            self.accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running; False if `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def Embed(self, stream: Stream[edge_pb2.EmbedRequest, edge_pb2.EmbedResponse]) -> None:
        """Embed a batch of inputs, answering vectors in input order."""
        fields: dict[str, object] = {"rpc": "Embed", "zone": self.zone, "traceparent": _traceparent(stream)}
        with self._rpc(fields):
            request = await _receive(stream)
            fields.update(model=request.model, inputs=len(request.inputs))
            model = pick_model(request.model, self.models)
            if isinstance(model, SmallLM):
                raise EdgeError(ErrorKind.BAD_INPUT, f"model {request.model!r} generates text; call Generate")
            texts = check_embed_inputs(request.inputs, self.limits)
            # Inference runs on the inference threads (through the batcher), never on the loop, so
            # health checks and other connections stay responsive.
            result = await self.embedder.embed(request.model, model, texts)
            # Wire bytes straight from the vectors (edge.wire): the server's codec sends them as they are.
            response = embed_response(
                request.model, result.vectors, result.prompt_tokens, result.token_counts
            )
            # Still tracked while sending: a drain must not close the connection under this answer.
            await stream.send_message(response)  # type: ignore[arg-type]
            fields.update(prompt_tokens=result.prompt_tokens)

    async def Generate(self, stream: Stream[edge_pb2.GenerateRequest, edge_pb2.GenerateChunk]) -> None:
        """Stream a completion from the small LM, one chunk per piece of text that is safe to send."""
        fields: dict[str, object] = {"rpc": "Generate", "zone": self.zone, "traceparent": _traceparent(stream)}
        with self._rpc(fields):
            request = await _receive(stream)
            fields.update(model=request.model, prefix=len(request.prefix_token_ids))
            model = pick_model(request.model, self.models)
            if not isinstance(model, SmallLM):
                raise EdgeError(ErrorKind.BAD_INPUT, f"model {request.model!r} embeds text; call Embed")
            params = check_generate(request, self.generate_limits)
            prompt = check_prompt(request, model.chat_prompt, self.generate_limits)
            loop = asyncio.get_running_loop()
            try:
                # Tokenizing a long prompt takes a while too: off the loop like every model step.
                chunks = await loop.run_in_executor(self.executor, model.stream, prompt, params)
            except ContextOverflow as exc:
                raise EdgeError(ErrorKind.CONTEXT_OVERFLOW, str(exc)) from None
            except ValueError as exc:  # the runtime's other checks (token ids, settings)
                raise EdgeError(ErrorKind.BAD_INPUT, str(exc)) from None
            while (chunk := await loop.run_in_executor(self.executor, next, chunks, None)) is not None:
                await stream.send_message(edge_pb2.GenerateChunk(
                    text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason or "",
                    prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                ))
                fields.update(completion_tokens=chunk.completion_tokens, finish_reason=chunk.finish_reason)

    @contextlib.contextmanager
    def _rpc(self, fields: dict[str, object]) -> Iterator[None]:
        """Track one call as in flight, map its errors to gRPC status, and log it at debug."""
        started = time.perf_counter()
        try:
            with self._track():
                yield
            fields["status"] = "OK"
        except EdgeError as exc:
            fields.update(status=GRPC_STATUS[exc.kind].name, error=exc.message)
            raise GRPCError(GRPC_STATUS[exc.kind], exc.message) from None
        except (GRPCError, asyncio.CancelledError) as exc:
            fields.update(status=getattr(getattr(exc, "status", None), "name", "CANCELLED"))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug or a broken model: answer INTERNAL, keep serving
            fields.update(status="INTERNAL", error=repr(exc))
            self._log.exception("request failed", extra={"fields": fields})
            raise GRPCError(Status.INTERNAL, f"{fields['rpc']} failed: {type(exc).__name__}") from None
        finally:
            fields["ms"] = elapsed_ms(started)
            self._log.debug("request", extra={"fields": fields})

    @contextlib.contextmanager
    def _track(self) -> Iterator[None]:
        """Count a request as in flight, refusing it while loading or draining."""
        if not self.accepting:
            state = "draining" if self.models else "loading models"
            raise EdgeError(
                ErrorKind.UNAVAILABLE, f"edge worker in zone {self.zone} is {state}; retry elsewhere"
            )
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


async def _receive(stream: Stream) -> edge_pb2.EmbedRequest | edge_pb2.GenerateRequest:
    """The request message; undecodable bytes (e.g. invalid UTF-8 in a string) are bad input."""
    try:
        request = await stream.recv_message()
    except DecodeError as exc:
        raise EdgeError(
            ErrorKind.BAD_INPUT, f"request could not be decoded (strings must be UTF-8): {exc}"
        ) from None
    if request is None:
        raise EdgeError(ErrorKind.BAD_INPUT, "request message is missing")
    return request


def _traceparent(stream: Stream) -> str | None:
    """The caller's W3C trace context, carried as `traceparent` metadata."""
    value = stream.metadata.get("traceparent") if stream.metadata else None
    return value if isinstance(value, str) else None
