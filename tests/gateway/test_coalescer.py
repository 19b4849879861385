"""Embedding requests that wait for the same endpoint share RPCs; each keeps its own outcome.

The RPC here is an in-process function with the Embed contract (vectors in input order, tokens per
input, the whole call refused when one input is bad); tests/gateway/test_edge_coalescing.py runs the
same behaviour against a real edge worker.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.coalescer import Coalescer, EmbedReply
from gateway.errors import GatewayError, Kind, UpstreamFailure


class Edge:
    """Embed as the edge answers it: one row per input, a refusal for any input over 20 characters."""

    def __init__(self, delay: float = 0.02, counts: bool = True) -> None:
        self.delay = delay
        self.counts = counts
        self.calls: list[list[str]] = []
        self.fail: Exception | None = None

    async def __call__(self, model: str, inputs: list[str], timeout: float, traceparent: str | None) -> EmbedReply:
        self.calls.append(list(inputs))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if any(len(t) > 20 for t in inputs):
            raise GatewayError(Kind.BAD_REQUEST, "an input is too long")
        vectors = np.array([[float(len(t)), float(ord(t[0]))] for t in inputs], dtype=np.float32)
        tokens = tuple(len(t) + 2 for t in inputs)
        return EmbedReply(vectors, sum(tokens), tokens if self.counts else ())


async def warm(c: Coalescer) -> None:
    """One request alone: the edge shows it reports tokens per input, so coalescing starts."""
    await c.embed("m", ["warm"], timeout=5, traceparent=None)


async def test_idle_requests_go_at_once_and_queued_ones_share_the_next_rpc():
    edge = Edge()
    c = Coalescer(edge, max_inputs=64, max_in_flight=1)
    await warm(c)
    texts = [f"text {i}" for i in range(20)]
    results = await asyncio.gather(*(c.embed("m", [t], timeout=5, traceparent=None) for t in texts))
    # The first goes alone at once; the other 19 queued behind it and left together.
    assert [len(call) for call in edge.calls[1:]] == [1, 19]
    for text, result in zip(texts, results):
        assert np.array_equal(result.vectors, [[len(text), ord(text[0])]])
        assert result.prompt_tokens == len(text) + 2


async def test_inputs_per_rpc_are_capped_and_multi_input_requests_stay_whole():
    edge = Edge()
    c = Coalescer(edge, max_inputs=5, max_in_flight=1)
    await warm(c)
    batches = [[f"a{i}", f"b{i}"] for i in range(6)]
    results = await asyncio.gather(*(c.embed("m", b, timeout=5, traceparent=None) for b in batches))
    assert all(len(call) <= 5 for call in edge.calls)
    assert [r.vectors.shape[0] for r in results] == [2] * 6
    assert results[3].prompt_tokens == len("a3") + 2 + len("b3") + 2


async def test_a_bad_input_fails_only_its_own_request():
    edge = Edge()
    c = Coalescer(edge, max_inputs=64, max_in_flight=1)
    await warm(c)
    texts = ["fine one", "x" * 30, "fine two", "fine three"]
    results = await asyncio.gather(*(c.embed("m", [t], timeout=5, traceparent=None) for t in texts),
                                   return_exceptions=True)
    assert isinstance(results[1], GatewayError) and results[1].kind == Kind.BAD_REQUEST
    assert [r.vectors[0][0] for i, r in enumerate(results) if i != 1] == [8.0, 8.0, 10.0]


async def test_a_transport_failure_fails_every_request_of_the_rpc():
    edge = Edge()
    c = Coalescer(edge, max_inputs=64, max_in_flight=1)
    await warm(c)
    edge.fail = UpstreamFailure("edge unreachable", hard=True)
    results = await asyncio.gather(*(c.embed("m", [f"t{i}"], timeout=5, traceparent=None) for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, UpstreamFailure) and r.hard for r in results)


async def test_a_cancelled_request_leaves_the_others_alone():
    edge = Edge(delay=0.05)
    c = Coalescer(edge, max_inputs=64, max_in_flight=1)
    await warm(c)
    blocker = asyncio.ensure_future(c.embed("m", ["first"], timeout=5, traceparent=None))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(c.embed("m", ["gone"], timeout=5, traceparent=None))
    kept = asyncio.ensure_future(c.embed("m", ["kept"], timeout=5, traceparent=None))
    await asyncio.sleep(0)
    gone.cancel()
    assert (await kept).vectors[0][0] == 4.0
    await blocker
    assert ["gone"] not in edge.calls and ["kept"] in edge.calls


async def test_without_tokens_per_input_every_request_goes_alone():
    edge = Edge(counts=False)
    c = Coalescer(edge, max_inputs=64, max_in_flight=1)
    results = await asyncio.gather(*(c.embed("m", [f"t{i}"], timeout=5, traceparent=None) for i in range(6)))
    assert [len(call) for call in edge.calls] == [1] * 6
    assert [r.prompt_tokens for r in results] == [4] * 6


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_under_load_rpcs_are_far_fewer_than_requests(in_flight):
    edge = Edge(delay=0.01)
    c = Coalescer(edge, max_inputs=32, max_in_flight=in_flight)
    await warm(c)
    results = await asyncio.gather(*(c.embed("m", [f"r{i}"], timeout=5, traceparent=None) for i in range(100)))
    assert len(edge.calls) - 1 <= 100 // 32 + 2 * in_flight
    assert [r.vectors[0][0] for r in results] == [float(len(f"r{i}")) for i in range(100)]
