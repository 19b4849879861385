"""The lean Redis client against a real Redis, and against a server that never answers."""

from __future__ import annotations

import asyncio
import time

from gateway.resp import RespClient, RespConnectionError


async def test_concurrent_commands_pair_with_their_own_replies(redis_server):
    client = RespClient("127.0.0.1", redis_server.port)
    try:
        await asyncio.gather(*(client.set(f"resp:{i}", str(i)) for i in range(200)))
        got = await asyncio.gather(*(client.get(f"resp:{i}") for i in range(200)))
        assert got == [str(i).encode() for i in range(200)]
        assert await client.pipeline(("GET", "resp:7"), ("PTTL", "resp:7"), ("GET", "resp:missing")) == [b"7", -1, None]
    finally:
        await client.aclose()


async def test_a_silent_server_times_out_every_waiting_command():
    async def silent(reader, writer):
        await reader.read()  # reads commands, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    client = RespClient("127.0.0.1", server.sockets[0].getsockname()[1], timeout=0.2)
    started = time.monotonic()
    try:
        results = await asyncio.gather(*(client.get(f"k{i}") for i in range(5)), return_exceptions=True)
    finally:
        await client.aclose()
        server.close()
    assert all(isinstance(r, RespConnectionError) for r in results)
    assert 0.15 < time.monotonic() - started < 1.0


async def test_reconnects_after_the_connection_drops(redis_server):
    client = RespClient("127.0.0.1", redis_server.port)
    try:
        await client.set("resp:again", "1")
        client._protocol.transport.abort()  # the connection breaks under the client
        await asyncio.sleep(0.01)
        assert await client.get("resp:again") == b"1"
    finally:
        await client.aclose()
