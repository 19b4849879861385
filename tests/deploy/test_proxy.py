"""The fault-injection proxy on loopback: latency, loss, blackhole, reset, and live changes."""

from __future__ import annotations

import asyncio
import time

import pytest

from deploy.drills.faults import Fault
from deploy.drills.proxy import FaultState, Forward, start_forwards


async def echo_tcp():
    async def handle(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class EchoUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class Receiver(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait(data)


def free_port(kind="tcp") -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def tcp_round_trip(port: int, payload: bytes = b"ping") -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 2)
    writer.close()
    assert got == payload
    return time.perf_counter() - started


async def test_tcp_latency_blackhole_and_reset():
    server, up_port = await echo_tcp()
    port = free_port()
    state = FaultState(seed=1)
    opened = await start_forwards(state, [Forward("tcp", ("127.0.0.1", port), ("127.0.0.1", up_port))])
    try:
        assert await tcp_round_trip(port) < 0.05
        state.set(Fault(latency_ms=40))
        assert await tcp_round_trip(port) >= 0.08  # both directions
        state.set(Fault(blackhole=True))
        with pytest.raises(asyncio.TimeoutError):
            await tcp_round_trip(port)
        # A connection open when the reset comes is reset; new ones are refused. Only reads are
        # checked: a reset is ConnectionResetError there, a clean close an IncompleteReadError (EOF).
        state.set(Fault())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 2) == b"x"  # forwarding, before the reset
        state.set(Fault(reset=True))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.readexactly(1), 2)
        writer.close()
        with pytest.raises((ConnectionResetError, ConnectionRefusedError)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(reader.readexactly(1), 2)
        writer.close()
        state.set(Fault())
        assert await tcp_round_trip(port) < 0.05
    finally:
        for item in opened:
            item.close()
        server.close()


async def test_udp_latency_and_loss():
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(EchoUdp, local_addr=("127.0.0.1", 0))
    up_port = echo.get_extra_info("sockname")[1]
    port = free_port("udp")
    state = FaultState(Fault(latency_ms=30), seed=2)
    opened = await start_forwards(state, [Forward("udp", ("127.0.0.1", port), ("127.0.0.1", up_port))])
    client, receiver = await loop.create_datagram_endpoint(Receiver, remote_addr=("127.0.0.1", port))
    try:
        started = time.perf_counter()
        client.sendto(b"a")
        assert await asyncio.wait_for(receiver.queue.get(), 2) == b"a"
        assert time.perf_counter() - started >= 0.06
        state.set(Fault(loss=0.5))
        for i in range(200):
            client.sendto(b"x")
        await asyncio.sleep(0.3)
        # Each datagram crosses the proxy twice: about a quarter come back.
        assert 20 <= receiver.queue.qsize() <= 90
    finally:
        client.close()
        echo.close()
        for item in opened:
            item.close()


def test_fault_validation():
    with pytest.raises(ValueError):
        Fault(loss=2)
    with pytest.raises(ValueError):
        Fault.from_dict({"latency": 3})
    assert Fault.from_dict({"latency_ms": 3}).latency_ms == 3


async def reply_after_eof(hold: asyncio.Event | None = None):
    """An upstream that reads the request to the client's EOF (half-close), then replies."""

    async def handle(reader, writer):
        data = await reader.read()
        if hold is not None:
            await hold.wait()
        writer.write(b"REPLY:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def half_closed_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    await writer.drain()
    writer.write_eof()
    return reader, writer


async def test_tcp_half_close_still_gets_the_reply():
    server, up_port = await reply_after_eof()
    opened = await start_forwards(FaultState(), [Forward("tcp", ("127.0.0.1", 0), ("127.0.0.1", up_port))])
    port = opened[0].sockets[0].getsockname()[1]
    try:
        reader, writer = await half_closed_client(port)
        assert await asyncio.wait_for(reader.read(), 2) == b"REPLY:hello"
        writer.close()
    finally:
        for item in opened:
            item.close()
        server.close()


async def test_tcp_reset_aborts_a_half_closed_connection_at_once():
    hold = asyncio.Event()  # the upstream never replies: only the reset can end the connection
    server, up_port = await reply_after_eof(hold)
    state = FaultState()
    opened = await start_forwards(state, [Forward("tcp", ("127.0.0.1", 0), ("127.0.0.1", up_port))])
    port = opened[0].sockets[0].getsockname()[1]
    try:
        reader, writer = await half_closed_client(port)
        await asyncio.sleep(0.1)  # the half-close has crossed the proxy
        state.set(Fault(reset=True))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 2)
        writer.close()
    finally:
        hold.set()
        for item in opened:
            item.close()
        server.close()
