"""The transport contract: one request value in, one response (headers now, body as a stream) out.

Like httpx's transports, the client above never knows whether HTTP/3 or HTTP/1.1 carried a request;
it hands an `HttpRequest` to a `Transport` and reads the `HttpResponse` it gets back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from mobile.errors import ConfigError

# Methods that never change server state (RFC 9110 section 9.2.1): replaying them is harmless.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request as a transport sees it; header names are lower case."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ConfigError(f"request path must start with '/': {self.path!r}")
        if any(k != k.lower() for k in self.headers):
            raise ConfigError("header names must be lower case")

    @property
    def replay_safe(self) -> bool:
        """Whether the server may see this request twice: GET, or any request with an idempotency key.

        Only these may travel as 0-RTT data (an attacker can replay early data) or be sent again
        after they may have reached the server.
        """
        return self.method in SAFE_METHODS or bool(self.headers.get("idempotency-key"))


@dataclass(slots=True)
class HttpResponse:
    """Status and headers as soon as they arrive; the body is read (once) from `stream`."""

    status: int
    headers: dict[str, str]
    stream: AsyncIterator[bytes]
    protocol: str  # "h3" | "http/1.1"
    early_data: bool = False  # the request went out as 0-RTT data
    on_close: Callable[[], Awaitable[None]] | None = None

    async def aread(self, timeout: float | None = None) -> bytes:
        """The whole body (each chunk must come within `timeout`)."""
        try:
            parts = [chunk async for chunk in iter_with_timeout(self.stream, timeout)]
        finally:
            await self.aclose()  # also after a timeout or a cut: the stream must not linger
        return b"".join(parts)

    async def aclose(self) -> None:
        """Stop reading; the transport frees (or cancels) the stream."""
        if self.on_close is not None:
            close, self.on_close = self.on_close, None
            await close()


class Transport(Protocol):
    """What the client needs from HTTP/3 or HTTP/1.1."""

    protocol: str

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Send the request; return once the response headers arrived."""
        ...

    async def aclose(self) -> None:
        """Close every connection."""
        ...


async def iter_with_timeout(stream: AsyncIterator[bytes], timeout: float | None) -> AsyncIterator[bytes]:
    """The chunks of `stream`, each of which must arrive within `timeout` seconds."""
    from mobile.errors import RequestTimeout

    it = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), timeout) if timeout else await it.__anext__()
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no data for {timeout:g} s", sent=True) from None
        yield chunk


class SSEDecoder:
    """Server-Sent Events, sans-IO: feed bytes, get the `data:` payloads of complete events."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The payloads of the events that `chunk` completed."""
        self._buffer += chunk
        out: list[str] = []
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                return out
            self._buffer = rest
            text = line.rstrip(b"\r").decode()
            if not text:  # a blank line ends an event
                if self._data:
                    out.append("\n".join(self._data))
                    self._data = []
            elif text.startswith("data:"):
                self._data.append(text[5:].removeprefix(" "))
            # comments (":") and other fields (event, id, retry) carry nothing the API uses
