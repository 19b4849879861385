"""The HTTP/1.1 listener's hard edges on raw sockets: Expect, early answers that close, header limits, drain."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import time

import pytest

from gateway.app import Gateway
from gateway.config import parse_topology
from gateway.http1 import Http1Listener
from gateway.upstreams import UpstreamPool
from tests.gateway.test_pipeline import KEY, TOPOLOGY
from tests.support.fakes import FakeUpstream, SlowCore

LIMITS = {"max_headers": 20, "max_header_bytes": 4096, "body_timeout_s": 0.5}  # max_body_bytes is 2048
EMBED = b'{"model": "embed", "input": "x"}'


async def start_listener(core: FakeUpstream | None = None) -> Http1Listener:
    raw = copy.deepcopy(TOPOLOGY)
    raw["gateway"].update(LIMITS)
    pool = UpstreamPool([FakeUpstream("zone-a", "edge"), core or FakeUpstream("zone-a", "core")])
    await pool.check_once()
    h1 = Http1Listener(Gateway(parse_topology(raw), pool), h3_port=None)
    await h1.start("127.0.0.1", 0)
    return h1


@pytest.fixture(scope="module")
async def port():
    h1 = await start_listener()
    yield h1.port
    await h1.close()


def head(path: str = "/v1/embeddings", length: int = len(EMBED), extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


async def read_until_eof(reader: asyncio.StreamReader, within: float) -> tuple[bytes, bool]:
    """What arrives within `within` seconds, and whether the server closed the connection by then."""
    data, deadline = b"", time.monotonic() + within
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), deadline - time.monotonic()):
            data += chunk
    except (asyncio.TimeoutError, ValueError):
        return data, False
    return data, True


async def test_expect_100_continue_is_answered_before_the_body(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(extra="Expect: 100-continue\r\n"))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)  # curl waits 1 s without it
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(EMBED)
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_expect_over_the_body_limit_is_413_and_closes(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(length=100_000, extra="Expect: 100-continue\r\n"))
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer
    assert b"connection: close" in answer.lower()
    # A request sent after it is not served: the connection closes instead of lingering 10 s.
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    rest, eof = await read_until_eof(reader, 2.5)
    assert eof and b"HTTP/1.1" not in rest
    writer.close()


async def test_unknown_expect_is_417_and_closes(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(extra="Expect: teapot\r\n"))
    data, eof = await read_until_eof(reader, 2.5)
    assert data.startswith(b"HTTP/1.1 417") and b"expectation_failed" in data
    assert eof
    writer.close()


async def test_body_timeout_408_closes_the_socket(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(length=40) + b'{"model"')
    started = time.monotonic()
    data, eof = await read_until_eof(reader, 3.0)
    assert data.startswith(b"HTTP/1.1 408") and b"body_timeout" in data
    assert eof and time.monotonic() - started < 3.0
    writer.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_its_content_encoding_does_not_decode_is_a_json_400(port, encoding: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(length=2, extra=f"Content-Encoding: {encoding}\r\n") + b"xx")
    data, _ = await read_until_eof(reader, 1.5)
    status, _, body = data.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400") and b"application/json" in status.lower()
    assert json.loads(body)["error"]["code"] == "invalid_content_encoding"
    writer.close()
    # The same body compressed for real is served.
    packed = gzip.compress(EMBED)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(length=len(packed), extra="Content-Encoding: gzip\r\n") + packed)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 1.0)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_total_header_bytes_over_the_limit_is_431(port):
    # Twelve 400-byte headers: each line is far under max_header_bytes (4096), their sum is not.
    pads = "".join(f"X-Pad-{i}: {'v' * 400}\r\n" for i in range(12))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(extra=pads) + EMBED)
    data, eof = await read_until_eof(reader, 2.5)
    assert data.startswith(b"HTTP/1.1 431") and b"headers_too_large" in data
    assert eof
    writer.close()


async def test_header_count_over_the_limit_is_431(port):
    pads = "".join(f"X-Pad-{i}: v\r\n" for i in range(25))  # max_headers is 20
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(extra=pads) + EMBED)
    data, _ = await read_until_eof(reader, 2.5)
    assert data.startswith(b"HTTP/1.1 431") and b"headers_too_large" in data
    writer.close()


def stream_request(chunks: int) -> bytes:
    body = json.dumps({"model": "llm", "prompt": "x", "stream": True, "max_tokens": chunks}).encode()
    return head("/v1/completions", len(body)) + body


async def test_close_grace_lets_a_stream_finish_and_refuses_new_connections():
    core = SlowCore(chunks=25)  # 2.5 s: longer than the old fixed 2 s grace
    h1 = await start_listener(core)
    port = h1.port
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    idle_w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(idle_r.readuntil(b'{"status":"ok"}'), 1.0)  # now an idle keep-alive connection
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(stream_request(25))
    await asyncio.sleep(0.3)
    closing = asyncio.ensure_future(h1.close(grace_s=6.0))
    await asyncio.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    # The idle connection is closed at once rather than served during the grace.
    _, idle_eof = await read_until_eof(idle_r, 0.5)
    assert idle_eof
    data, eof = await read_until_eof(reader, 5.0)
    assert eof and b"t24 " in data and b"[DONE]" in data
    assert core.sent == 25
    # Nothing is left in flight, so close returns without waiting out the grace.
    await asyncio.wait_for(closing, 1.5)
    idle_w.close()
    writer.close()


async def test_close_cuts_a_stream_still_running_when_the_grace_ends():
    core = SlowCore(chunks=50)
    h1 = await start_listener(core)
    reader, writer = await asyncio.open_connection("127.0.0.1", h1.port)
    writer.write(stream_request(50))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await asyncio.wait_for(h1.close(grace_s=0.5), 3.0)
    assert time.monotonic() - started >= 0.5
    data, eof = await read_until_eof(reader, 1.0)
    assert eof and b"[DONE]" not in data and core.sent < 50
    writer.close()
