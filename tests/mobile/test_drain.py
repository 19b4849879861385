"""The SDK against a gateway that drains (SIGTERM): the stream in flight ends whole, new requests
go on a new connection and come back unsent, so the client may send them elsewhere."""

from __future__ import annotations

import asyncio
import json

import pytest

from mobile.errors import TransportError
from mobile.h3 import H3Transport
from mobile.http import HttpRequest
from mobile.tls import TlsSettings
from tests.gateway.test_listeners import slow_h3
from tests.gateway.test_pipeline import KEY
from tests.support.fakes import SlowCore

HEADERS = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}


def _post(path: str, body: dict) -> HttpRequest:
    return HttpRequest("POST", path, dict(HEADERS), json.dumps(body).encode())


async def test_a_draining_gateway_finishes_the_stream_in_flight_and_new_requests_come_back_unsent(tmp_path):
    core = SlowCore(chunks=12)  # 100 ms a chunk: still streaming when the drain begins
    h3 = await slow_h3(tmp_path, core)
    transport = H3Transport("127.0.0.1", h3.port, tls=TlsSettings(verify=False), migration_check_s=None)
    closing = None
    try:
        streaming = await transport.handle(_post("/v1/completions", {
            "model": "llm", "prompt": "x", "stream": True, "max_tokens": 12}))
        reading = asyncio.ensure_future(streaming.aread(timeout=5))
        await asyncio.sleep(0.3)
        draining = transport.connection
        closing = asyncio.ensure_future(h3.close(grace_s=5.0))
        await asyncio.sleep(0.2)
        assert not draining.usable, "the GOAWAY was not read"
        # Twice: the second request must not close the connection the stream is still running on.
        for _ in range(2):
            with pytest.raises(TransportError) as refused:
                reply = await transport.handle(_post("/v1/embeddings", {"model": "embed", "input": "x"}))
                await reply.aread(timeout=5)
            assert refused.value.sent is False
            assert transport.connection is not draining
        body = await reading
        await closing
        await asyncio.sleep(0.1)
        assert draining.closed_reason, "the drained connection stayed open once its last stream ended"
    finally:
        if closing is None:
            await h3.close()
        await transport.aclose()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert core.sent == 12 and not core.closed_early.is_set()
