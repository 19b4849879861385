"""A real edge worker on a free port, called through grpclib like the gateway will call it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from edge.api import edge_pb2
from edge.api.edge_grpc import EdgeStub
from edge.config import EdgeConfig
from edge.runtime.embedding import EmbeddingModel, EmbedResult
from edge.server import EdgeServer

MODEL = "all-minilm-l6-v2"
SERVICE = "meridian.edge.v1.Edge"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _config(model_dir: Path, **overrides: object) -> EdgeConfig:
    """A worker on a free loopback port with small limits (so the limit tests stay cheap)."""
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "zone": "test-zone",
        "models": {MODEL: model_dir},
        "threads": 1,
        "workers": 2,
        "max_batch_inputs": 8,
        "max_input_chars": 2000,
        "drain_timeout_s": 5.0,
        "drain_grace_s": 0.0,
    }
    settings.update(overrides)
    return EdgeConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def server(embedding_model_dir: Path) -> AsyncIterator[EdgeServer]:
    """One in-process worker for the module."""
    running = EdgeServer(_config(embedding_model_dir))
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def channel(server: EdgeServer) -> AsyncIterator[Channel]:
    """A client channel to the module's worker."""
    async with Channel("127.0.0.1", server.port) as chan:
        yield chan


async def _status(channel: Channel, service: str = "") -> int:
    """What grpc.health.v1 Check says for `service` ('' is the overall status)."""
    reply = await HealthStub(channel).Check(HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def _embed_error(channel: Channel, request: edge_pb2.EmbedRequest) -> GRPCError:
    """The error an Embed call fails with (the test fails if it succeeds)."""
    with pytest.raises(GRPCError) as caught:
        await EdgeStub(channel).Embed(request, timeout=30)
    return caught.value


async def test_health_is_serving(channel: Channel) -> None:
    assert await _status(channel) == HealthCheckResponse.SERVING
    assert await _status(channel, SERVICE) == HealthCheckResponse.SERVING


async def test_embed_returns_unit_vectors_in_input_order(channel: Channel, embedding_model_dir: Path) -> None:
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by 4%.", "東京タワー", "a"]
    reply = await EdgeStub(channel).Embed(
        edge_pb2.EmbedRequest(model=MODEL, inputs=texts),
        metadata={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    vectors = np.array([e.values for e in reply.embeddings], dtype=np.float32)
    assert reply.model == MODEL
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = EmbeddingModel.load(embedding_model_dir).embed(texts)
    np.testing.assert_allclose(vectors, expected.vectors, atol=1e-5)  # same order as the inputs
    assert reply.prompt_tokens == expected.prompt_tokens > 0


@pytest.mark.parametrize(
    ("request_", "status", "fragment"),
    [
        (edge_pb2.EmbedRequest(model=MODEL), Status.INVALID_ARGUMENT, "inputs is empty"),
        (edge_pb2.EmbedRequest(model=MODEL, inputs=["x"] * 9), Status.INVALID_ARGUMENT, "too many inputs"),
        (edge_pb2.EmbedRequest(model=MODEL, inputs=["ok", "y" * 2001]), Status.INVALID_ARGUMENT, "inputs[1]"),
        (edge_pb2.EmbedRequest(model="gpt-9", inputs=["x"]), Status.NOT_FOUND, "gpt-9"),
        (edge_pb2.EmbedRequest(inputs=["x"]), Status.INVALID_ARGUMENT, "model is required"),
    ],
    ids=["no-inputs", "too-many-inputs", "oversized-input", "unknown-model", "no-model"],
)
async def test_bad_requests_get_clear_errors(
    channel: Channel, request_: edge_pb2.EmbedRequest, status: Status, fragment: str
) -> None:
    error = await _embed_error(channel, request_)
    assert error.status == status
    assert fragment in (error.message or "")
    assert await _status(channel) == HealthCheckResponse.SERVING


class _RawBytes:
    """A 'message' that is already serialized: lets the test send bytes no real client would."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


async def test_invalid_utf8_is_invalid_argument(channel: Channel) -> None:
    model = MODEL.encode()
    # EmbedRequest{model=MODEL, inputs=[b"\xff\xfe"]}: field 1 and field 2, both length-delimited.
    payload = bytes([0x0A, len(model)]) + model + bytes([0x12, 2]) + b"\xff\xfe"
    method = UnaryUnaryMethod(channel, f"/{SERVICE}/Embed", _RawBytes, edge_pb2.EmbedResponse)
    with pytest.raises(GRPCError) as caught:
        await method(_RawBytes(payload), timeout=10)
    assert caught.value.status == Status.INVALID_ARGUMENT
    assert "UTF-8" in (caught.value.message or "")


async def test_generate_names_the_served_models_when_asked_for_another(channel: Channel) -> None:
    with pytest.raises(GRPCError) as caught:
        await EdgeStub(channel).Generate(edge_pb2.GenerateRequest(model="small-lm", prompt="hi"), timeout=10)
    assert caught.value.status == Status.NOT_FOUND
    assert MODEL in (caught.value.message or "")


async def test_generate_on_an_embedding_model_is_invalid_argument(channel: Channel) -> None:
    with pytest.raises(GRPCError) as caught:
        await EdgeStub(channel).Generate(edge_pb2.GenerateRequest(model=MODEL, prompt="hi"), timeout=10)
    assert caught.value.status == Status.INVALID_ARGUMENT
    assert "call Embed" in (caught.value.message or "")


async def test_still_serving_after_bad_requests(channel: Channel) -> None:
    for _ in range(3):
        await _embed_error(channel, edge_pb2.EmbedRequest(model="nope", inputs=["x"]))
    reply = await EdgeStub(channel).Embed(
        edge_pb2.EmbedRequest(model=MODEL, inputs=["still here"]), timeout=30
    )
    assert len(reply.embeddings) == 1
    assert await _status(channel, SERVICE) == HealthCheckResponse.SERVING


async def test_health_answers_while_inference_runs(channel: Channel) -> None:
    long_text = "word " * 300
    embed = asyncio.create_task(
        EdgeStub(channel).Embed(edge_pb2.EmbedRequest(model=MODEL, inputs=[long_text] * 8), timeout=60)
    )
    await asyncio.sleep(0.02)  # let the request reach the inference thread
    started = time.perf_counter()
    assert await _status(channel) == HealthCheckResponse.SERVING
    health_s = time.perf_counter() - started
    reply = await embed
    assert len(reply.embeddings) == 8
    assert health_s < 0.5, f"health check took {health_s:.3f}s while an embedding ran"


class _SlowModel:
    """Stands in for an embedding model whose inference takes a while (to observe a drain)."""

    dimension = 384

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def embed(self, texts: list[str]) -> EmbedResult:
        """Wait, then return unit vectors."""
        self._loop.call_soon_threadsafe(self.started.set)
        time.sleep(self.seconds)
        vectors = np.zeros((len(texts), 384), np.float32)
        vectors[:, 0] = 1.0
        return EmbedResult(vectors, len(texts), (1,) * len(texts))


async def test_drain_finishes_in_flight_requests_and_refuses_new_ones(embedding_model_dir: Path) -> None:
    worker = EdgeServer(_config(embedding_model_dir))
    await worker.start()
    slow = _SlowModel(0.6)
    worker.service.models["slow"] = slow
    async with Channel("127.0.0.1", worker.port) as chan:
        in_flight = asyncio.create_task(
            EdgeStub(chan).Embed(edge_pb2.EmbedRequest(model="slow", inputs=["x"]), timeout=10)
        )
        await asyncio.wait_for(slow.started.wait(), 5)
        stopping = asyncio.create_task(worker.stop())
        await asyncio.sleep(0.05)
        assert await _status(chan) == HealthCheckResponse.NOT_SERVING
        assert await _status(chan, SERVICE) == HealthCheckResponse.NOT_SERVING
        refused = await _embed_error(chan, edge_pb2.EmbedRequest(model=MODEL, inputs=["late"]))
        assert refused.status == Status.UNAVAILABLE and "draining" in (refused.message or "")
        reply = await in_flight
        assert len(reply.embeddings) == 1
        await asyncio.wait_for(stopping, 10)


async def test_during_the_grace_period_new_requests_are_still_answered(embedding_model_dir: Path) -> None:
    worker = EdgeServer(_config(embedding_model_dir, drain_grace_s=0.5))
    await worker.start()
    async with Channel("127.0.0.1", worker.port) as chan:
        stopping = asyncio.create_task(worker.stop())
        await asyncio.sleep(0.05)
        assert await _status(chan) == HealthCheckResponse.NOT_SERVING
        reply = await EdgeStub(chan).Embed(edge_pb2.EmbedRequest(model=MODEL, inputs=["late but welcome"]), timeout=10)
        assert len(reply.embeddings) == 1
        await asyncio.sleep(0.6)
        # Past the grace period the worker refuses: UNAVAILABLE while it still drains, a closed
        # connection once it has stopped (here at once: nothing was in flight).
        with pytest.raises((GRPCError, ConnectionError)) as refused:
            await EdgeStub(chan).Embed(edge_pb2.EmbedRequest(model=MODEL, inputs=["too late"]), timeout=10)
        if isinstance(refused.value, GRPCError):
            assert refused.value.status == Status.UNAVAILABLE
        await asyncio.wait_for(stopping, 10)


async def test_port_zero_binds_a_free_port(server: EdgeServer) -> None:
    assert server.port > 0


@pytest.mark.integration
async def test_cli_serves_then_exits_zero_on_sigterm(embedding_model_dir: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    argv = ["-m", "edge.server", "--host", "127.0.0.1", "--port", "0", "--zone", "cli-zone"]
    argv += ["--model", f"{MODEL}={embedding_model_dir}", "--threads", "1", "--port-file", str(port_file),
             "--drain-grace", "0.2"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():  # written once the worker reports SERVING
            assert process.returncode is None, await process.communicate()
            assert time.monotonic() < deadline, "worker did not report its port in time"
            await asyncio.sleep(0.05)
        async with Channel("127.0.0.1", int(port_file.read_text())) as chan:
            assert await _status(chan, SERVICE) == HealthCheckResponse.SERVING
            reply = await EdgeStub(chan).Embed(edge_pb2.EmbedRequest(model=MODEL, inputs=["hi"]), timeout=30)
            assert len(reply.embeddings[0].values) == 384
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 0, err
    assert out == b"" and err == b"", "the worker should be quiet at the default log level"
