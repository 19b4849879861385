"""The gateway's edge client against a real edge worker: concurrent embedding requests share RPCs,
and each still gets the vectors and token count it would have got alone."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from edge.config import EdgeConfig
from edge.export import build_embedding_model
from edge.server import EdgeServer
from gateway.edge_client import EdgeUpstream
from gateway.errors import GatewayError, Kind

MODEL = "all-minilm-l6-v2"
MAX_CHARS = 200


@pytest.fixture(scope="module")
async def edge(cache_dir: Path) -> AsyncIterator[EdgeServer]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = build_embedding_model(cache_dir / "edge" / MODEL)
    server = EdgeServer(EdgeConfig(host="127.0.0.1", port=0, zone="z", models={MODEL: model_dir},
                                   max_input_chars=MAX_CHARS, drain_grace_s=0.0, drain_timeout_s=2.0))
    await server.start()
    yield server
    await server.stop()


async def alone(edge: EdgeServer, texts: list[str]):
    """What each text gets in an RPC of its own."""
    upstream = EdgeUpstream("z", "127.0.0.1", edge.port, max_in_flight=64)
    try:
        return [await upstream.embed(MODEL, [t], timeout=30) for t in texts]
    finally:
        await upstream.close()


async def test_concurrent_requests_share_rpcs_and_keep_their_own_answers(edge):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the sea'}" for i in range(24)]
    expected = await alone(edge, texts)
    upstream = EdgeUpstream("z", "127.0.0.1", edge.port, max_in_flight=1, max_inputs=32)
    try:
        await upstream.embed(MODEL, ["warm up"], timeout=30)
        before = upstream.rpcs
        got = await asyncio.gather(*(upstream.embed(MODEL, [t], timeout=30) for t in texts))
        rpcs = upstream.rpcs - before
    finally:
        await upstream.close()
    assert rpcs < len(texts) / 4, rpcs
    for mine, reference in zip(got, expected):
        assert mine.prompt_tokens == reference.prompt_tokens
        np.testing.assert_allclose(mine.vectors, reference.vectors, atol=1e-5)


async def test_a_bad_input_fails_only_its_own_request(edge):
    upstream = EdgeUpstream("z", "127.0.0.1", edge.port, max_in_flight=1, max_inputs=32)
    try:
        await upstream.embed(MODEL, ["warm up"], timeout=30)
        texts = ["a good one", "x" * (MAX_CHARS + 1), "another good one", "and a third"]
        got = await asyncio.gather(*(upstream.embed(MODEL, [t], timeout=30) for t in texts), return_exceptions=True)
    finally:
        await upstream.close()
    assert isinstance(got[1], GatewayError) and got[1].kind == Kind.BAD_REQUEST
    assert f"limit is {MAX_CHARS}" in str(got[1])
    assert all(np.asarray(r.vectors).shape == (1, 384) for i, r in enumerate(got) if i != 1)
