"""A lean Redis client: one pipelined connection, hiredis for parsing.

The gateway asks Redis once or twice per request (cache lookup, tenant limits), so the client is
on the hot path. redis-py's asyncio client spends about 150 us of CPU per command in pool, retry
and parser layers; this one writes the command and parks a future in a FIFO, and the protocol
resolves futures as hiredis parses replies, about an order of magnitude less. Redis answers in
order on one connection, so pipelining falls out of the FIFO. While commands are in flight, the
ones issued in one event-loop iteration leave in one write, and one timer watches the oldest
command instead of one timer each: under load the syscall and the timer, not the parsing, were
most of a command's cost.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis


class RespError(Exception):
    """Redis answered with an error reply."""


class RespConnectionError(ConnectionError):
    """No connection to Redis, or it broke or timed out mid-command."""


def _encode(args: Sequence[Any]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient) -> None:
        self._client = client
        self._reader = hiredis.Reader(replyError=RespError)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiters = self._client._waiters
        while (reply := self._reader.gets()) is not False:
            if not waiters:
                continue
            fut = waiters.popleft()[0]
            if fut.done():
                continue
            if isinstance(reply, RespError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc) -> None:
        self._client._lost(exc)


class RespClient:
    """Commands over one connection, opened lazily and reopened after a failure."""

    def __init__(self, host: str, port: int, db: int = 0, *, timeout: float = 0.25) -> None:
        self.host, self.port, self.db = host, port, db
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        # (future, deadline) per command sent, in the order Redis will answer them.
        self._waiters: deque[tuple[asyncio.Future, float]] = deque()
        self._outgoing: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None

    async def execute(self, *args: Any) -> Any:
        """Send one command and wait for its reply."""
        if self._protocol is None:
            await self._connect()
        return await self._send(_encode(args), 1)[0]

    async def pipeline(self, *commands: Sequence[Any]) -> list[Any]:
        """Send several commands in one write; their replies in order (an error reply raises)."""
        if self._protocol is None:
            await self._connect()
        futures = self._send(b"".join(_encode(c) for c in commands), len(commands))
        replies = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return list(replies)

    def _send(self, data: bytes, count: int) -> list[asyncio.Future]:
        """Queue `count` encoded commands; a future for each reply."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            raise RespConnectionError("redis connection lost")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        futures = [loop.create_future() for _ in range(count)]
        idle = not self._waiters
        self._waiters.extend((fut, deadline) for fut in futures)
        if idle and not self._outgoing:
            # Nothing in flight: no company to wait for, write at once (Nagle's rule).
            protocol.transport.write(data)
        else:
            if not self._outgoing:
                loop.call_soon(self._flush)
            self._outgoing.append(data)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout, self._watch)
        return futures

    def _flush(self) -> None:
        data, self._outgoing = b"".join(self._outgoing), []
        protocol = self._protocol
        if data and protocol is not None and protocol.transport is not None:
            protocol.transport.write(data)

    def _watch(self) -> None:
        """Time out the oldest unanswered command, or look again when it is due."""
        self._watchdog = None
        if not self._waiters:
            return
        fut, deadline = self._waiters[0]
        loop = asyncio.get_running_loop()
        if deadline > loop.time():
            self._watchdog = loop.call_at(deadline, self._watch)
            return
        if not fut.done():
            fut.set_exception(RespConnectionError(f"redis did not answer within {self.timeout}s"))
        # Replies would now pair with the wrong waiters: drop the connection and start over.
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.host, self.port), self.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise RespConnectionError(f"cannot connect to redis at {self.host}:{self.port}: {exc}") from None
        self._protocol = protocol
        if self.db:
            await self.execute("SELECT", self.db)
        return protocol

    def _lost(self, exc: BaseException | None) -> None:
        self._protocol = None
        self._outgoing = []
        while self._waiters:
            fut = self._waiters.popleft()[0]
            if not fut.done():
                fut.set_exception(RespConnectionError(f"redis connection lost: {exc}"))

    # -- commands -------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        return await self.execute("GET", key)

    async def set(self, key: str, value: bytes | str, *, ex: int | None = None, px: int | None = None,
                  nx: bool = False) -> bool:
        args: list[Any] = ["SET", key, value]
        if ex is not None:
            args += ["EX", ex]
        if px is not None:
            args += ["PX", px]
        if nx:
            args.append("NX")
        return await self.execute(*args) is not None

    async def get_and_exists(self, key: str, other: str) -> tuple[bytes | None, bool]:
        """GET key and EXISTS other, pipelined."""
        got, exists = await self.pipeline(("GET", key), ("EXISTS", other))
        return got, bool(exists)

    async def ping(self) -> bool:
        return await self.execute("PING") in (b"PONG", "PONG")

    async def flushall(self) -> None:
        await self.execute("FLUSHALL")

    def script(self, source: str) -> Script:
        """A Lua script run by EVALSHA (loaded on first NOSCRIPT)."""
        return Script(self, source)

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


class Script:
    """EVALSHA with the source sent once, when Redis does not know the script yet."""

    def __init__(self, client: RespClient, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self._client.execute("EVALSHA", self._sha, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self._client.execute("EVAL", self._source, len(keys), *keys, *args)
