"""HTTP/1.1 over TLS on asyncio streams: the fallback when UDP is blocked or QUIC is too slow.

Small on purpose: one request per connection at a time (no pipelining), keep-alive through a tiny
idle pool, bodies framed by Content-Length, chunked transfer coding, or the connection's end.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mobile.errors import ConnectError, HandshakeTimeout, ProtocolError, TransportError
from mobile.http import HttpRequest, HttpResponse
from mobile.tls import TlsSettings

MAX_HEADER_BYTES = 64 * 1024


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class H1Transport:
    """HTTP/1.1 over TLS (or plain TCP when `use_tls` is off) to one server."""

    protocol = "http/1.1"

    def __init__(self, host: str, port: int, *, tls: TlsSettings, use_tls: bool = True,
                 handshake_timeout: float = 3.0, server_name: str | None = None, max_idle: int = 4) -> None:
        self.host, self.port = host, port
        self.server = f"{host}:{port}"
        self._ssl: ssl.SSLContext | None = tls.ssl_context(["http/1.1"]) if use_tls else None
        self._server_name = server_name or host
        self._handshake_timeout = handshake_timeout
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self.handshakes = 0

    async def _open(self) -> _Conn:
        """A new connection, its TLS handshake done."""
        self.handshakes += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=MAX_HEADER_BYTES,
                                        server_hostname=self._server_name if self._ssl else None),
                self._handshake_timeout,
            )
        except asyncio.TimeoutError:
            raise HandshakeTimeout(f"TCP/TLS handshake with {self.server} took over {self._handshake_timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {self.server}: {exc}") from None
        return _Conn(reader, writer)

    async def connect(self) -> None:
        """Open one connection ahead of a request (used when racing QUIC) and keep it idle."""
        self._release(await self._open())

    def _release(self, conn: _Conn) -> None:
        if len(self._idle) < self._max_idle and not conn.writer.is_closing():
            self._idle.append(conn)
        else:
            conn.close()

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Send on an idle connection (or a new one); return when the headers arrived."""
        while self._idle:
            conn = self._idle.pop()
            if conn.writer.is_closing() or conn.reader.at_eof():
                conn.close()
                continue
            try:
                return await self._exchange(conn, request)
            except TransportError as exc:
                # Likely a kept-alive connection the server closed meanwhile. Once the request was
                # flushed the server may have run it, so only a replay-safe one goes out again.
                conn.close()
                if exc.sent and not request.replay_safe:
                    raise
        return await self._exchange(await self._open(), request)

    async def _exchange(self, conn: _Conn, request: HttpRequest) -> HttpResponse:
        head = [f"{request.method} {request.path} HTTP/1.1", f"host: {self._authority()}"]
        head += [f"{k}: {v}" for k, v in request.headers.items() if k not in ("host", "content-length")]
        if request.body or request.method not in ("GET", "HEAD"):
            head.append(f"content-length: {len(request.body)}")
        try:
            conn.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + request.body)
            await conn.writer.drain()
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"connection to {self.server} failed: {exc}", sent=False) from None
        # Flushed: from here on the server may be running the request, whatever comes back.
        try:
            status_line = await conn.reader.readline()
        except (OSError, ssl.SSLError, ValueError) as exc:
            conn.close()
            raise TransportError(f"connection to {self.server} failed: {exc}", sent=True) from None
        if not status_line:
            conn.close()
            raise TransportError(f"{self.server} closed the connection before answering", sent=True)
        try:
            status, headers = _parse_head(status_line, await _read_headers(conn.reader))
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            conn.close()
            raise TransportError(f"connection to {self.server} failed: {exc}", sent=True) from None
        except ProtocolError:
            conn.close()
            raise
        keep = headers.get("connection", "").lower() != "close"
        done = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in _read_body(conn.reader, headers, request.method):
                    yield chunk
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError) as exc:
                raise TransportError(f"response body from {self.server} cut: {exc}", sent=True) from None
            done.set()

        async def close() -> None:
            # Reusable only if the body was read to its end; otherwise closing is the cancellation.
            if done.is_set() and keep and ("content-length" in headers or "chunked" in headers.get("transfer-encoding", "")):
                self._release(conn)
            else:
                conn.close()

        return HttpResponse(status, headers, body(), "http/1.1", on_close=close)

    def _authority(self) -> str:
        return self._server_name if self.port == 443 else f"{self._server_name}:{self.port}"

    async def aclose(self) -> None:
        """Close idle connections."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _read_headers(reader: asyncio.StreamReader) -> list[bytes]:
    lines, size = [], 0
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise ProtocolError("response headers too large", sent=True)
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line)


def _parse_head(status_line: bytes, lines: list[bytes]) -> tuple[int, dict[str, str]]:
    """(status, lower-cased headers) from a status line and header lines."""
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {status_line[:80]!r}", sent=True)
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:80]!r}", sent=True)
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], method: str) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, de-chunked."""
    if method == "HEAD":
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            chunk = await reader.read(min(left, 65536))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(chunk)
            yield chunk
    else:
        while chunk := await reader.read(65536):
            yield chunk
