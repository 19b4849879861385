"""A small HTTP/3 client on aioquic for the tests: one connection, many requests."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamReset


@dataclass
class H3Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    reset_code: int | None = None  # the server reset the stream with this code

    def json(self):
        return msgspec.json.decode(self.body)

    def sse_events(self) -> list[str]:
        """The `data:` payloads of a Server-Sent Events body."""
        return [line[len("data: "):] for line in self.body.decode().split("\n") if line.startswith("data: ")]


class _Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self._streams: dict[int, asyncio.Queue] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):  # not an H3 event: passed on as it is
            self._h3_event(event)
        for h3_event in self.http.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        queue = self._streams.get(getattr(event, "stream_id", -1))
        if queue is not None:
            queue.put_nowait(event)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes, authority: str,
                      trailers: dict[str, str] | None = None, cancel_after: int | None = None) -> H3Response:
        """One request; with `cancel_after`, the answer is read only that many DATA chunks far and then
        cancelled as a client that goes away does (STOP_SENDING with H3_REQUEST_CANCELLED: the request
        itself is complete, so there is nothing of ours to reset)."""
        stream_id = self._quic.get_next_available_stream_id()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[stream_id] = queue
        h = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode()),
             (b":path", path.encode())] + [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if body and "content-length" not in headers:  # a test may send a wrong one on purpose
            h.append((b"content-length", str(len(body)).encode()))
        self.http.send_headers(stream_id, h, end_stream=not body and not trailers)
        if body:
            self.http.send_data(stream_id, body, end_stream=not trailers)
        if trailers:  # the request then ends on its trailers, not on its last DATA frame
            self.http.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in trailers.items()], end_stream=True)
        self.transmit()
        response = H3Response(0, {})
        try:
            while cancel_after is None or len(response.chunks) < cancel_after:
                event = await queue.get()
                if isinstance(event, StreamReset):
                    response.reset_code = event.error_code
                    break
                if isinstance(event, HeadersReceived):
                    for k, v in event.headers:
                        if k == b":status":
                            response.status = int(v)
                        else:
                            response.headers[k.decode()] = v.decode()
                elif isinstance(event, DataReceived) and event.data:
                    response.chunks.append(event.data)
                if event.stream_ended:
                    break
        finally:
            del self._streams[stream_id]
        if cancel_after is not None:
            self._quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
            self.transmit()
        response.body = b"".join(response.chunks)
        return response


class H3Client:
    def __init__(self, protocol: _Client, authority: str, api_key: str | None) -> None:
        self._protocol = protocol
        self._authority = authority
        self._api_key = api_key

    async def request(self, method: str, path: str, *, json=None, body: bytes = b"",
                      headers: dict[str, str] | None = None, auth: bool = True,
                      trailers: dict[str, str] | None = None, cancel_after: int | None = None) -> H3Response:
        h = dict(headers or {})
        if json is not None:
            body = msgspec.json.encode(json)
            h.setdefault("content-type", "application/json")
        if auth and self._api_key:
            h.setdefault("authorization", f"Bearer {self._api_key}")
        return await self._protocol.request(method, path, h, body, self._authority, trailers, cancel_after)

    async def post_then_reset(self, path: str, *, json, chunks: int = 1) -> H3Response:
        """POST `json`, read `chunks` chunks of the answer, then cancel the stream."""
        return await self.request("POST", path, json=json, cancel_after=chunks)

    async def get(self, path: str, **kw) -> H3Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw) -> H3Response:
        return await self.request("POST", path, **kw)


@asynccontextmanager
async def h3_client(host: str, port: int, api_key: str | None = None) -> AsyncIterator[H3Client]:
    """An HTTP/3 connection to host:port (certificate checks off: the local cert is self-signed)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE)
    async with connect(host, port, configuration=config, create_protocol=_Client) as protocol:
        yield H3Client(protocol, f"{host}:{port}", api_key)
