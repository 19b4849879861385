"""The protocol-neutral request and response the listeners translate to and from.

HTTP/3 and HTTP/1.1 listeners build a `Request` from their protocol events and write back a
`Response`; every step of the pipeline sees only these values, so it runs without sockets in tests.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import msgspec

from gateway.errors import GatewayError

JSON = "application/json"
SSE = "text/event-stream"
REQUEST_ID = "x-request-id"
# A caller's own request id is kept when it is a plain token (it lands in logs and headers as is).
_CALLER_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    # Header names are lower-case; a repeated header keeps its last value.
    headers: dict[str, str]
    body: bytes
    client_ip: str
    protocol: str  # "h3" or "http/1.1"
    query: str = ""


def request_id(headers: Mapping[str, str]) -> str:
    """The id of a request for its answer and the logs: the caller's `x-request-id` (as from a load
    balancer in front) when it is a plain token of at most 128 characters, else a fresh one."""
    given = headers.get(REQUEST_ID, "")
    return given if _CALLER_ID.fullmatch(given) else uuid.uuid4().hex


class ClosingStream:
    """Body chunks whose `aclose()` always runs `on_close`, even when nobody began to iterate them
    (a client that leaves before the first chunk is written): an async generator that never
    started skips its `finally`, and the upstream stream behind it would stay open."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]]) -> None:
        self._chunks, self._on_close = chunks, on_close

    def __aiter__(self) -> ClosingStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            await self._on_close()


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # A streamed body (Server-Sent Events); when set, `body` is ignored. The listener must
    # `aclose()` it whatever happens: that frees what produces it.
    stream: AsyncIterator[bytes] | ClosingStream | None = None

    @classmethod
    def json(cls, data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """A JSON answer."""
        return cls(status, {"content-type": JSON, **(headers or {})}, msgspec.json.encode(data))

    @classmethod
    def error(cls, err: GatewayError) -> Response:
        """The OpenAI-style error answer for `err`."""
        return cls(err.status, {"content-type": JSON, **err.headers}, err.body())

    @classmethod
    def refusal(cls, err: GatewayError, headers: Mapping[str, str]) -> Response:
        """The error answer a listener gives a request it refuses before the pipeline sees it
        (headers or body over the limits, a body too slow), named by the request's id too."""
        response = cls.error(err)
        response.headers[REQUEST_ID] = request_id(headers)
        return response

    @classmethod
    def event_stream(cls, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> Response:
        """A Server-Sent Events answer."""
        base = {"content-type": SSE, "cache-control": "no-cache"}
        return cls(200, {**base, **(headers or {})}, stream=chunks)
