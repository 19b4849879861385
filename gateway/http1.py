"""The HTTP/1.1 listener (aiohttp's low-level server): bytes in, `Request` out, `Response` back."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError

from gateway.app import Gateway, body_timeout, header_limit, too_large, too_many_connections, undecodable_body
from gateway.errors import GatewayError, Kind
from gateway.http import Request, Response

# How long a connection we are closing after an early answer (413, 408, 431, 417) keeps reading and
# dropping the unread body, so the client sees the answer rather than a reset; aiohttp's 10 s default
# held such sockets open long after the answer.
LINGER_S = 1.0
# After the drain grace: time left for answers already returned to aiohttp to be written, before
# what is still open is cut.
_CUT_S = 0.5
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Http1Listener:
    """Serves the gateway over HTTP/1.1 and advertises HTTP/3 with Alt-Svc."""

    def __init__(self, gateway: Gateway, *, h3_port: int | None) -> None:
        cfg = gateway.topology.gateway
        self._gateway = gateway
        self._max_body = cfg.max_body_bytes
        self._body_timeout = cfg.body_timeout_s
        self._max_headers = cfg.max_headers
        self._max_header_bytes = cfg.max_header_bytes
        self._alt_svc = f'h3=":{h3_port}"; ma=86400' if h3_port else None
        self._max_connections = cfg.max_connections
        # Connections with a request in our handler, which a drain waits for; the rest are idle.
        self._busy: set[web.RequestHandler] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        # handler_cancellation: a client that goes away cancels its handler, and so its generation.
        # The parser caps each line; the total and the count are checked per request (431, as on
        # HTTP/3), so the parser's count is only a memory backstop (beyond it aiohttp answers 400).
        self._server = web.Server(
            self._handle,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=cfg.idle_timeout_s,
            lingering_time=LINGER_S,
            max_line_size=cfg.max_header_bytes,
            max_field_size=cfg.max_header_bytes,
            max_headers=2 * cfg.max_headers,
        )
        self._tcp: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        """Bind and start accepting connections (over TLS when `tls` is given)."""
        loop = asyncio.get_running_loop()
        self._tcp = await loop.create_server(self._protocol, host, port, reuse_address=True, backlog=1024, ssl=tls)

    def _protocol(self) -> asyncio.BaseProtocol:
        """aiohttp's handler for a new connection, or, past the connection limit, a 503 and close."""
        if self._max_connections and len(self._server.connections) >= self._max_connections:
            return _Refusal(Response.refusal(too_many_connections(self._max_connections), {}))
        return self._server()

    @property
    def port(self) -> int:
        assert self._tcp is not None
        return self._tcp.sockets[0].getsockname()[1]

    async def close(self, grace_s: float = 2.0) -> None:
        """Stop accepting, let requests in flight (streams included) finish for up to `grace_s`
        seconds, then close whatever is left."""
        if self._tcp is None:
            return
        self._tcp.close()  # new connections are refused from here on
        self._draining = True
        # Idle keep-alive connections would otherwise take new requests during the grace.
        for conn in self._server.connections:
            if conn not in self._busy:
                conn.force_close()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except asyncio.TimeoutError:
            pass
        await self._server.shutdown(timeout=_CUT_S)
        await self._tcp.wait_closed()

    async def _handle(self, raw: web.BaseRequest) -> web.StreamResponse:
        conn = raw.protocol
        self._busy.add(conn)
        self._idle.clear()
        try:
            out = await self._serve(raw)
            if self._draining:
                out.force_close()  # answer, then close: the listener is going away
            return out
        finally:
            self._busy.discard(conn)
            if not self._busy:
                self._idle.set()

    async def _serve(self, raw: web.BaseRequest) -> web.StreamResponse:
        body = self._refusal(raw) or await self._receive(raw)
        if isinstance(body, Response):
            # The body is unread or partly read: the connection cannot carry another request.
            return await self._write(raw, body, close=True)
        request = Request(
            method=raw.method,
            path=raw.path,
            headers={k.lower(): v for k, v in raw.headers.items()},
            body=body,
            client_ip=raw.remote or "",
            protocol="http/1.1",
            query=raw.query_string,
        )
        return await self._write(raw, await self._gateway.handle(request))

    async def _receive(self, raw: web.BaseRequest) -> bytes | Response:
        """The body, or the error answer when it is too large or too slow."""
        if _wants_continue(raw):
            # aiohttp's low-level server leaves this to the application (its router's
            # _default_expect_handler does the same); without it clients stall before the body.
            await raw.writer.write(_CONTINUE)
            raw.writer.output_size = 0
        try:
            body = await asyncio.wait_for(self._read_body(raw), self._body_timeout)
        except asyncio.TimeoutError:
            return Response.refusal(body_timeout(self._body_timeout), raw.headers)
        except (RequestPayloadError, BadHttpMessage):  # a body its Content-Encoding does not decode
            return Response.refusal(undecodable_body(raw.headers.get("content-encoding", "")), raw.headers)
        return Response.refusal(too_large(self._max_body), raw.headers) if body is None else body

    def _refusal(self, raw: web.BaseRequest) -> Response | None:
        """The answer due before any of the body is read, or None to go on."""
        size = sum(len(k) + len(v) for k, v in raw.raw_headers)
        if len(raw.raw_headers) > self._max_headers or size > self._max_header_bytes:
            return Response.refusal(header_limit(self._max_headers, self._max_header_bytes), raw.headers)
        expect = raw.headers.get("expect")
        if expect is not None and _http11(raw) and expect.lower() != "100-continue":
            return _expectation_failed(expect, raw.headers)
        if raw.content_length is not None and raw.content_length > self._max_body:
            return Response.refusal(too_large(self._max_body), raw.headers)
        return None

    async def _read_body(self, raw: web.BaseRequest) -> bytes | None:
        """The body, or None when it exceeds the limit (read no further than limit + 1 bytes)."""
        body = bytearray()
        while chunk := await raw.content.read(self._max_body + 1 - len(body)):
            body += chunk
            if len(body) > self._max_body:
                return None
        return bytes(body)

    async def _write(self, raw: web.BaseRequest, response: Response, *, close: bool = False) -> web.StreamResponse:
        headers = dict(response.headers)
        if self._alt_svc:
            headers["alt-svc"] = self._alt_svc
        if response.stream is None:
            out = web.Response(status=response.status, headers=headers, body=response.body)
            if close:
                # aiohttp decides keep-alive from the response (and then closes after LINGER_S);
                # a connection header alone would leave the socket open.
                out.force_close()
            return out
        out = web.StreamResponse(status=response.status, headers=headers)
        try:
            await out.prepare(raw)
            async for chunk in response.stream:
                await out.write(chunk)
        finally:
            await response.stream.aclose()
        await out.write_eof()
        return out


def _http11(raw: web.BaseRequest) -> bool:
    # An HTTP/1.0 request's Expect is ignored (RFC 9110 §10.1.1).
    return raw.version >= (1, 1)


class _Refusal(asyncio.Protocol):
    """A connection past the limit: the answer at once, whatever the request, then close. What the
    client sends meanwhile is read and dropped for LINGER_S, so the close does not reset the
    connection before the client has read the answer."""

    def __init__(self, answer: Response) -> None:
        head = [f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}"]
        head += [f"{k}: {v}" for k, v in answer.headers.items()]
        head += [f"content-length: {len(answer.body)}", "connection: close", "", ""]
        self._bytes = "\r\n".join(head).encode() + answer.body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._bytes)
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass


def _wants_continue(raw: web.BaseRequest) -> bool:
    return _http11(raw) and raw.headers.get("expect", "").lower() == "100-continue" and raw.body_exists


def _expectation_failed(expect: str, headers: Mapping[str, str]) -> Response:
    error = GatewayError(Kind.EXPECTATION_FAILED, f"unsupported Expect: {expect[:64]}", code="expectation_failed")
    return Response.refusal(error, headers)
