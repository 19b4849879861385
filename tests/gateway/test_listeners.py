"""Both listeners on real sockets in front of the pipeline: translation and hard edges."""

from __future__ import annotations

import asyncio
import copy
import logging

import msgspec
import pytest

from gateway.app import Gateway
from gateway.config import parse_topology
from gateway.http1 import Http1Listener
from gateway.http3 import Http3Listener
from gateway.tls import ensure_self_signed
from gateway.upstreams import UpstreamPool
from tests.gateway.test_pipeline import KEY, TOPOLOGY
from tests.support.fakes import FakeUpstream, SlowCore
from tests.support.h3 import h3_client


@pytest.fixture(scope="module")
async def listeners(tmp_path_factory):
    raw = copy.deepcopy(TOPOLOGY)
    raw["gateway"].update({"max_headers": 20, "max_header_bytes": 4096, "max_streams_per_connection": 4,
                           "body_timeout_s": 0.5})
    topo = parse_topology(raw)
    ups = [FakeUpstream("zone-a", "edge"), FakeUpstream("zone-a", "core")]
    ups[1].delay = 0.3
    pool = UpstreamPool(ups)
    await pool.check_once()
    gw = Gateway(topo, pool)
    tls = tmp_path_factory.mktemp("tls")
    ensure_self_signed(tls / "cert.pem", tls / "key.pem")
    h3 = Http3Listener(gw, cert=str(tls / "cert.pem"), key=str(tls / "key.pem"))
    await h3.start("127.0.0.1", 0)
    h1 = Http1Listener(gw, h3_port=h3.port)
    await h1.start("127.0.0.1", 0)
    yield h1.port, h3.port
    await h1.close()
    await h3.close()


async def http1(port: int, raw: bytes, wait: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), wait)
    writer.close()
    return data


def request_bytes(body: bytes, extra: str = "", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {n}\r\n{extra}\r\n")
    return head.encode() + body


async def test_http1_answers_with_alt_svc_and_openapi(listeners):
    h1_port, h3_port = listeners
    reply = await http1(h1_port, request_bytes(b'{"model": "embed", "input": "x"}'))
    assert reply.startswith(b"HTTP/1.1 200")
    assert f'alt-svc: h3=":{h3_port}"'.encode() in reply.lower()
    doc = await http1(h1_port, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"HTTP/1.1 200" in doc and b'"openapi":"3.1.0"' in doc


async def test_http1_slow_body_is_408(listeners):
    h1_port, _ = listeners
    reply = await http1(h1_port, request_bytes(b'{"model"', length=40), wait=5)
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"body_timeout" in reply


async def test_http1_too_many_headers_is_refused(listeners):
    h1_port, _ = listeners
    extra = "".join(f"X-Pad-{i}: {i}\r\n" for i in range(200))
    reply = await http1(h1_port, request_bytes(b"{}", extra))
    assert reply.split(b" ")[1] in (b"400", b"431")
    # The listener still serves.
    assert (await http1(h1_port, request_bytes(b'{"model": "embed", "input": "x"}'))).startswith(b"HTTP/1.1 200")


async def test_h3_header_limits_and_body_limit(listeners):
    _, h3_port = listeners
    async with h3_client("127.0.0.1", h3_port, KEY) as c:
        many = await c.post("/v1/embeddings", json={"model": "embed", "input": "x"},
                            headers={f"x-pad-{i}": "v" for i in range(30)})
        assert many.status == 431 and many.json()["error"]["code"] == "headers_too_large"
        big = await c.post("/v1/embeddings", body=b"x" * 5000)
        assert big.status == 413
        ok = await c.post("/v1/embeddings", json={"model": "embed", "input": "x"})
        assert ok.status == 200


async def test_h3_request_ending_on_trailers_is_served(listeners):
    _, h3_port = listeners
    async with h3_client("127.0.0.1", h3_port, KEY) as c:
        r = await asyncio.wait_for(c.post("/v1/embeddings", json={"model": "embed", "input": "x"},
                                          trailers={"x-checksum": "abc"}), 0.4)  # under body_timeout_s
    assert r.status == 200, r.body


async def test_head_is_get_without_a_body(listeners):
    h1_port, h3_port = listeners
    async with h3_client("127.0.0.1", h3_port, KEY) as c:
        get, head = await c.get("/healthz"), await asyncio.wait_for(c.request("HEAD", "/healthz"), 5)
        assert (await c.get("/healthz")).status == 200  # the connection lives on
    assert head.status == get.status == 200
    assert head.body == b"" and head.headers["content-type"] == get.headers["content-type"]
    reply = await http1(h1_port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n")  # headers only


async def test_h3_concurrent_stream_limit(listeners):
    _, h3_port = listeners
    async with h3_client("127.0.0.1", h3_port, KEY) as c:
        body = {"model": "llm", "prompt": "x", "max_tokens": 6}
        replies = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))
    statuses = sorted(r.status for r in replies)
    assert statuses.count(200) >= 4 and 429 in statuses
    refused = next(r for r in replies if r.status == 429)
    assert refused.json()["error"]["code"] == "too_many_streams"


async def test_h3_stream(listeners):
    _, h3_port = listeners
    async with h3_client("127.0.0.1", h3_port, KEY) as c:
        r = await c.post("/v1/completions", json={"model": "llm", "prompt": "x", "stream": True, "max_tokens": 6})
    assert r.status == 200
    assert r.sse_events()[-1] == "[DONE]"
    assert msgspec.json.decode(r.sse_events()[0])["object"] == "text_completion"


async def slow_h3(tmp_path, core: SlowCore) -> Http3Listener:
    pool = UpstreamPool([FakeUpstream("zone-a", "edge"), core])
    await pool.check_once()
    ensure_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    h3 = Http3Listener(Gateway(parse_topology(copy.deepcopy(TOPOLOGY)), pool), cert=str(tmp_path / "cert.pem"),
                       key=str(tmp_path / "key.pem"))
    await h3.start("127.0.0.1", 0)
    return h3


async def test_h3_drain_finishes_streams_in_flight_and_refuses_new_ones(tmp_path):
    core = SlowCore(chunks=8)
    h3 = await slow_h3(tmp_path, core)
    async with h3_client("127.0.0.1", h3.port, KEY) as c:
        body = {"model": "llm", "prompt": "x", "stream": True, "max_tokens": 8}
        in_flight = asyncio.ensure_future(c.post("/v1/completions", json=body))
        await asyncio.sleep(0.25)  # a few chunks out
        closing = asyncio.ensure_future(h3.close(grace_s=5.0))
        await asyncio.sleep(0.1)
        late = await c.post("/v1/embeddings", json={"model": "embed", "input": "x"})
        finished = await in_flight
        await closing
    assert late.reset_code == 0x10B  # H3_REQUEST_REJECTED: never processed, safe to send elsewhere
    assert finished.status == 200 and finished.sse_events()[-1] == "[DONE]"
    assert core.sent == 8 and not core.closed_early.is_set()


async def test_h3_malformed_request_fails_its_stream_not_the_connection(tmp_path):
    core = SlowCore(chunks=6)
    h3 = await slow_h3(tmp_path, core)
    try:
        async with h3_client("127.0.0.1", h3.port, KEY) as c:
            body = {"model": "llm", "prompt": "x", "stream": True, "max_tokens": 6}
            streaming = asyncio.ensure_future(c.post("/v1/completions", json=body))
            await asyncio.sleep(0.15)
            bad = await asyncio.wait_for(c.post("/v1/embeddings", body=b'{"model": "embed"}',
                                                headers={"content-length": "999"}), 5)  # not its DATA's size
            done = await asyncio.wait_for(streaming, 5)
            after = await c.post("/v1/embeddings", json={"model": "embed", "input": "x"})
    finally:
        await h3.close()
    assert bad.reset_code == 0x10E  # H3_MESSAGE_ERROR, on that stream alone
    assert done.sse_events()[-1] == "[DONE]" and after.status == 200


async def test_h3_client_reset_cancels_its_generation(tmp_path, caplog):
    core = SlowCore()
    h3 = await slow_h3(tmp_path, core)
    try:
        async with h3_client("127.0.0.1", h3.port, KEY) as c:
            body = {"model": "llm", "prompt": "x", "stream": True, "max_tokens": 50}
            first = await c.post_then_reset("/v1/completions", json=body, chunks=1)
            assert first.status == 200 and first.body.startswith(b"data: ")
            # The upstream stream is closed soon after the reset, not run to its 50 chunks.
            await asyncio.wait_for(core.closed_early.wait(), 2.0)
            assert core.sent < 10
            # The connection and the listener go on serving.
            ok = await c.post("/v1/embeddings", json={"model": "embed", "input": "x"})
            assert ok.status == 200
    finally:
        await h3.close()
    # Cancelled quietly: no handler died writing into the cancelled stream.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.fixture
async def one_connection_each(tmp_path):
    """Both listeners, each holding at most one connection."""
    raw = copy.deepcopy(TOPOLOGY)
    raw["gateway"]["max_connections"] = 1
    pool = UpstreamPool([FakeUpstream("zone-a", "edge"), FakeUpstream("zone-a", "core")])
    await pool.check_once()
    gw = Gateway(parse_topology(raw), pool)
    ensure_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    h3 = Http3Listener(gw, cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem"))
    await h3.start("127.0.0.1", 0)
    h1 = Http1Listener(gw, h3_port=h3.port)
    await h1.start("127.0.0.1", 0)
    yield h1, h3
    await h1.close()
    await h3.close()


async def test_h3_past_the_connection_limit_a_connection_is_refused_and_the_next_one_served(one_connection_each):
    _, h3 = one_connection_each
    async with h3_client("127.0.0.1", h3.port, KEY) as held:
        assert (await held.get("/v1/models")).status == 200
        with pytest.raises(ConnectionError):
            async with h3_client("127.0.0.1", h3.port, KEY) as refused:
                await refused.get("/v1/models")
        assert (await held.get("/v1/models")).status == 200  # the one held is untouched
        assert h3.open_connections == 1
    for _ in range(50):  # the close reaches the server a moment later
        if h3.open_connections == 0:
            break
        await asyncio.sleep(0.02)
    async with h3_client("127.0.0.1", h3.port, KEY) as next_one:
        assert (await next_one.get("/v1/models")).status == 200


async def test_http1_past_the_connection_limit_a_connection_gets_a_503_and_the_next_one_is_served(one_connection_each):
    h1, _ = one_connection_each
    get = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", h1.port)
    writer.write(get)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
    refused = await http1(h1.port, get)  # while the first stays open (keep-alive)
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"retry-after: 1" in head.lower() and b"x-request-id" in head.lower()
    assert msgspec.json.decode(body)["error"]["code"] == "overloaded"
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.1)  # the server sees the close
    assert (await http1(h1.port, get)).startswith(b"HTTP/1.1 200")
