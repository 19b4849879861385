"""The edge's gRPC server under a client's resets (`edge/grpc_server.py`): RPCs cancelled as they
arrive, and resets of streams already answered, leave the connection serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.client import Channel

from edge.api import edge_pb2
from edge.api.edge_grpc import EdgeStub
from edge.config import EdgeConfig
from edge.server import EdgeServer

EMBED = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
async def worker(embedding_model_dir: Path) -> AsyncIterator[EdgeServer]:
    server = EdgeServer(EdgeConfig(host="127.0.0.1", port=0, zone="z", models={EMBED: embedding_model_dir},
                                   drain_grace_s=0.0, drain_timeout_s=2.0))
    await server.start()
    yield server
    await server.stop()


async def test_requests_cancelled_as_they_arrive_do_not_wear_out_the_connection(worker):
    # HEADERS, DATA and RST_STREAM written in one go reach the server in one read, so its handler
    # task is cancelled before it ever ran. 160 x 30 KB is more than the connection's 4 MiB
    # flow-control window: if those bodies were never released, the connection would stall.
    big = edge_pb2.EmbedRequest(model=EMBED, inputs=["word " * 6000])
    async with Channel("127.0.0.1", worker.port) as channel:
        stub = EdgeStub(channel)
        for _ in range(160):
            async with stub.Embed.open() as stream:
                await stream.send_message(big, end=True)
                await stream.cancel()
        reply = await asyncio.wait_for(stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=["still served"])), 10)
    assert len(reply.embeddings) == 1


def test_a_reset_of_a_stream_whose_task_is_gone_is_ignored():
    # grpclib drops finished tasks from its table every few requests; a reset for such a stream
    # raised KeyError inside data_received, which drops the connection.
    from grpclib.encoding.proto import ProtoCodec

    from edge.grpc_server import Handler

    async def run() -> None:
        handler = Handler({}, ProtoCodec(), None, None)
        handler.cancel(object())
        assert not handler._cancelled

    asyncio.run(run())


async def test_a_stopped_worker_closes_its_connections(embedding_model_dir):
    # A client whose connection outlives the worker's drain must fail at once (and go elsewhere),
    # not wait out its deadline for an answer nobody will send.
    from grpclib.exceptions import StreamTerminatedError

    server = EdgeServer(EdgeConfig(host="127.0.0.1", port=0, zone="z", models={EMBED: embedding_model_dir},
                                   drain_grace_s=0.0, drain_timeout_s=2.0))
    await server.start()
    async with Channel("127.0.0.1", server.port) as channel:
        stub = EdgeStub(channel)
        await stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=["before"]))
        await server.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises((StreamTerminatedError, ConnectionError, OSError)):
            await stub.Embed(edge_pb2.EmbedRequest(model=EMBED, inputs=["after"]), timeout=5)
        assert loop.time() - started < 1.0
