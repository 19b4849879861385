"""The HTTP/1.1 listener (aiohttp's low-level server): bytes in, `Request` out, `Response` back."""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from gateway.app import Gateway, body_timeout, too_large
from gateway.http import Request, Response


class Http1Listener:
    """Serves the gateway over HTTP/1.1 and advertises HTTP/3 with Alt-Svc."""

    def __init__(self, gateway: Gateway, *, h3_port: int | None) -> None:
        cfg = gateway.topology.gateway
        self._gateway = gateway
        self._max_body = cfg.max_body_bytes
        self._body_timeout = cfg.body_timeout_s
        self._alt_svc = f'h3=":{h3_port}"; ma=86400' if h3_port else None
        # handler_cancellation: a client that goes away cancels its handler, and so its generation.
        self._server = web.Server(
            self._handle,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=cfg.idle_timeout_s,
            max_line_size=cfg.max_header_bytes,
            max_field_size=cfg.max_header_bytes,
            max_headers=cfg.max_headers,
        )
        self._tcp: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        """Bind and start accepting connections (over TLS when `tls` is given)."""
        loop = asyncio.get_running_loop()
        self._tcp = await loop.create_server(self._server, host, port, reuse_address=True, backlog=1024, ssl=tls)

    @property
    def port(self) -> int:
        assert self._tcp is not None
        return self._tcp.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting and close open connections."""
        if self._tcp is not None:
            self._tcp.close()
            await self._server.shutdown(timeout=2.0)
            await self._tcp.wait_closed()

    async def _handle(self, raw: web.BaseRequest) -> web.StreamResponse:
        try:
            body = await asyncio.wait_for(self._read_body(raw), self._body_timeout)
        except asyncio.TimeoutError:
            response = Response.error(body_timeout(self._body_timeout))
            response.headers["connection"] = "close"
            return await self._write(raw, response)
        if body is None:
            response = Response.error(too_large(self._max_body))
        else:
            request = Request(
                method=raw.method,
                path=raw.path,
                headers={k.lower(): v for k, v in raw.headers.items()},
                body=body,
                client_ip=raw.remote or "",
                protocol="http/1.1",
                query=raw.query_string,
            )
            response = await self._gateway.handle(request)
        return await self._write(raw, response)

    async def _read_body(self, raw: web.BaseRequest) -> bytes | None:
        """The body, or None when it exceeds the limit (read no further than limit + 1 bytes)."""
        if raw.content_length is not None and raw.content_length > self._max_body:
            return None
        body = bytearray()
        while chunk := await raw.content.read(self._max_body + 1 - len(body)):
            body += chunk
            if len(body) > self._max_body:
                return None
        return bytes(body)

    async def _write(self, raw: web.BaseRequest, response: Response) -> web.StreamResponse:
        headers = dict(response.headers)
        if self._alt_svc:
            headers["alt-svc"] = self._alt_svc
        if response.stream is None:
            return web.Response(status=response.status, headers=headers, body=response.body)
        out = web.StreamResponse(status=response.status, headers=headers)
        try:
            await out.prepare(raw)
            async for chunk in response.stream:
                await out.write(chunk)
        finally:
            await response.stream.aclose()
        await out.write_eof()
        return out
