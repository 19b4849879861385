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
from edge.errors import EdgeError, ErrorKind
from edge.logs import elapsed_ms, get_logger
from edge.runtime.embedding import EmbeddingModel
from edge.validation import EmbedLimits, check_embed_inputs, pick_model

if TYPE_CHECKING:
    from grpclib.server import Stream

# The one place where error kinds become gRPC status codes.
GRPC_STATUS = {
    ErrorKind.BAD_INPUT: Status.INVALID_ARGUMENT,
    ErrorKind.UNKNOWN_MODEL: Status.NOT_FOUND,
    ErrorKind.UNAVAILABLE: Status.UNAVAILABLE,
    ErrorKind.UNIMPLEMENTED: Status.UNIMPLEMENTED,
}


class EdgeService(EdgeBase):
    """Serves Embed from loaded models; Generate waits for the small LM (a later change)."""

    def __init__(self, zone: str, limits: EmbedLimits, executor: Executor) -> None:
        self.zone = zone
        self.limits = limits
        self.executor = executor
        self.models: dict[str, EmbeddingModel] = {}
        # What grpc.health.v1 reports for this service (and overall): NOT_SERVING until models load.
        self.health = ServiceStatus()
        self.health.set(False)
        self.accepting = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._log = get_logger()

    def ready(self, models: dict[str, EmbeddingModel]) -> None:
        """Start answering with `models`, and report SERVING."""
        self.models = models
        self.accepting = True
        self.health.set(True)

    def begin_drain(self) -> None:
        """Report NOT_SERVING and refuse new requests; running ones carry on."""
        self.accepting = False
        self.health.set(False)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running; False if `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def Embed(self, stream: Stream[edge_pb2.EmbedRequest, edge_pb2.EmbedResponse]) -> None:
        """Embed a batch of inputs, answering vectors in input order."""
        started = time.perf_counter()
        fields: dict[str, object] = {"rpc": "Embed", "zone": self.zone, "traceparent": _traceparent(stream)}
        try:
            with self._track():
                request = await _receive(stream)
                fields.update(model=request.model, inputs=len(request.inputs))
                model = pick_model(request.model, self.models)
                texts = check_embed_inputs(request.inputs, self.limits)
                loop = asyncio.get_running_loop()
                # Inference holds a core for milliseconds to seconds: keep it off the loop so health
                # checks and other connections stay responsive.
                result = await loop.run_in_executor(self.executor, model.embed, texts)
                response = edge_pb2.EmbedResponse(model=request.model, prompt_tokens=result.prompt_tokens)
                response.embeddings.extend(edge_pb2.Embedding(values=row) for row in result.vectors.tolist())
                # Still tracked while sending: a drain must not close the connection under this answer.
                await stream.send_message(response)
            fields.update(status="OK", prompt_tokens=result.prompt_tokens)
        except EdgeError as exc:
            fields.update(status=GRPC_STATUS[exc.kind].name, error=exc.message)
            raise GRPCError(GRPC_STATUS[exc.kind], exc.message) from None
        except (GRPCError, asyncio.CancelledError) as exc:
            fields.update(status=getattr(getattr(exc, "status", None), "name", "CANCELLED"))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug or a broken model: answer INTERNAL, keep serving
            fields.update(status="INTERNAL", error=repr(exc))
            self._log.exception("embed failed", extra={"fields": fields})
            raise GRPCError(Status.INTERNAL, f"embedding failed: {type(exc).__name__}") from None
        finally:
            fields["ms"] = elapsed_ms(started)
            self._log.debug("request", extra={"fields": fields})

    async def Generate(self, stream: Stream[edge_pb2.GenerateRequest, edge_pb2.GenerateChunk]) -> None:
        """Not served yet: the edge's small LM is not deployed in this version."""
        self._log.debug(
            "request", extra={"fields": {"rpc": "Generate", "zone": self.zone, "status": "UNIMPLEMENTED"}}
        )
        raise GRPCError(
            Status.UNIMPLEMENTED,
            "Generate is not available on this edge worker yet (embeddings only); send generation to the core",
        )

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


async def _receive(stream: Stream[edge_pb2.EmbedRequest, edge_pb2.EmbedResponse]) -> edge_pb2.EmbedRequest:
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
