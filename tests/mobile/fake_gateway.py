"""An in-process stand-in for the gateway: HTTP/3 (aioquic, issues session tickets) and HTTPS/1.1
(aiohttp) serving the same small app, recording what arrived and in which QUIC epoch."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ProtocolNegotiated, StopSendingReceived, StreamReset
from aioquic.tls import Epoch

from gateway.tls import ensure_self_signed


@dataclass
class Seen:
    """One request as the server got it."""

    protocol: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    conn: int = 0  # id of the QUIC connection
    stream_id: int = -1
    peer: tuple | None = None


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0  # HTTP/3: a pause before each body chunk, so a client can leave mid-answer


def default_app(seen: Seen) -> Reply:
    """A few OpenAI-shaped answers."""
    path = seen.path
    h = {"content-type": "application/json", "x-meridian-zone": "z1", "x-meridian-tier": "core", "x-meridian-cache": "miss"}
    if path == "/v1/models":
        return Reply(200, h, [json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "meridian", "meridian_tier": "core"}]}).encode()])
    body = json.loads(seen.body or b"{}")
    if path == "/v1/embeddings":
        return Reply(200, h, [json.dumps({"object": "list", "model": "e", "data": [{"index": 0, "embedding": [0.5, 0.25]}]}).encode()])
    if path in ("/v1/completions", "/v1/chat/completions"):
        chat = path.endswith("chat/completions")
        if body.get("stream"):
            h = {**h, "content-type": "text/event-stream"}
            events = []
            for word in ("hel", "lo"):
                choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
                events.append(b"data: " + json.dumps({"id": "x", "model": "m", "created": 1, "choices": [choice]}).encode() + b"\n\n")
            return Reply(200, h, events + [b"data: [DONE]\n\n"])
        choice = ({"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"} if chat
                  else {"index": 0, "text": "hello", "finish_reason": "stop"})
        return Reply(200, h, [json.dumps({"id": "x", "model": "m", "created": 1, "choices": [choice],
                                          "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}).encode()])
    return Reply(404, h, [b'{"error": {"message": "no such route", "type": "invalid_request_error"}}'])


class _Tickets:
    def __init__(self) -> None:
        self.tickets: dict = {}

    def add(self, t) -> None:
        self.tickets[t.ticket] = t

    def pop(self, label):
        return self.tickets.pop(label, None)


class FakeGateway:
    """Both listeners on free loopback ports; `app` decides each answer; `seen` keeps every request."""

    def __init__(self, tls_dir: Path, app: Callable[[Seen], Reply] = default_app) -> None:
        self.cert, self.key = tls_dir / "cert.pem", tls_dir / "key.pem"
        ensure_self_signed(self.cert, self.key)
        self.app = app
        self.seen: list[Seen] = []
        self.epochs: dict[tuple[int, int], set] = {}  # (conn, stream) -> epochs its STREAM frames came in
        self.cancelled: set[tuple[int, int]] = set()  # (conn, stream) the client sent STOP_SENDING or RESET on
        self.tickets = _Tickets()
        self.h3_port = self.https_port = 0
        self._closers: list = []
        self.udp_enabled = True

    async def start(self) -> FakeGateway:
        config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        config.load_cert_chain(str(self.cert), str(self.key))
        gw = self

        class Proto(QuicConnectionProtocol):
            def __init__(self, *a, **kw) -> None:
                super().__init__(*a, **kw)
                self.http: H3Connection | None = None
                self.pending: dict[int, Seen] = {}

            def quic_event_received(self, event) -> None:
                if isinstance(event, (StopSendingReceived, StreamReset)):
                    gw.cancelled.add((id(self._quic), event.stream_id))
                if isinstance(event, ProtocolNegotiated):
                    self.http = H3Connection(self._quic)
                if self.http is None:
                    return
                for ev in self.http.handle_event(event):
                    if isinstance(ev, HeadersReceived):
                        h = {k.decode(): v.decode() for k, v in ev.headers}
                        self.pending[ev.stream_id] = Seen("h3", h[":method"], h[":path"],
                                                          {k: v for k, v in h.items() if not k.startswith(":")}, b"",
                                                          id(self._quic), ev.stream_id, self._quic._network_paths[0].addr)
                    elif isinstance(ev, DataReceived) and ev.stream_id in self.pending:
                        self.pending[ev.stream_id].body += ev.data
                    if getattr(ev, "stream_ended", False) and ev.stream_id in self.pending:
                        seen = self.pending.pop(ev.stream_id)
                        gw.seen.append(seen)
                        asyncio.get_running_loop().create_task(self.answer(ev.stream_id, seen))

            async def answer(self, stream_id: int, seen: Seen) -> None:
                reply = gw.app(seen)
                if reply.delay_s:
                    await asyncio.sleep(reply.delay_s)
                headers = [(b":status", str(reply.status).encode())] + [(k.encode(), v.encode()) for k, v in reply.headers.items()]
                try:
                    self.http.send_headers(stream_id, headers)
                    for chunk in reply.chunks:
                        if reply.chunk_delay_s:
                            self.transmit()
                            await asyncio.sleep(reply.chunk_delay_s)
                        if (id(self._quic), stream_id) in gw.cancelled:
                            return  # the client left: a real gateway stops generating here
                        self.http.send_data(stream_id, chunk, end_stream=False)
                    self.http.send_data(stream_id, b"", end_stream=True)
                except (ValueError, RuntimeError):  # aioquic: the client reset or closed the stream meanwhile
                    return
                self.transmit()

        port = _free(socket.SOCK_DGRAM)
        server = await serve("127.0.0.1", port, configuration=config, create_protocol=Proto,
                             session_ticket_fetcher=self.tickets.pop, session_ticket_handler=self.tickets.add)
        self.h3_port = port
        receive = server.datagram_received
        server.datagram_received = lambda data, addr: receive(data, addr) if self.udp_enabled else None
        self._closers.append(server.close)

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            seen = Seen("http/1.1", request.method, request.path, {k.lower(): v for k, v in request.headers.items()},
                        await request.read())
            self.seen.append(seen)
            reply = self.app(seen)
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            out = web.StreamResponse(status=reply.status, headers=reply.headers)
            await out.prepare(request)
            for chunk in reply.chunks:
                await out.write(chunk)
            await out.write_eof()
            return out

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        lowlevel = web.Server(handle, access_log=None)
        tcp = await asyncio.get_running_loop().create_server(lowlevel, "127.0.0.1", 0, ssl=ctx)
        self.https_port = tcp.sockets[0].getsockname()[1]
        self._closers.append(tcp.close)
        return self

    async def close(self) -> None:
        for close in self._closers:
            close()

    def epochs_of(self, seen: Seen) -> set:
        """The QUIC epochs in which the request's STREAM frames arrived."""
        return self.epochs.get((seen.conn, seen.stream_id), set())


def spy_on_stream_epochs(monkeypatch, gateway: FakeGateway) -> None:
    """Record, on the server side, the packet epoch of every STREAM frame (0-RTT vs 1-RTT)."""
    original = QuicConnection._handle_stream_frame

    def spy(self, context, frame_type, buf):
        if not self._is_client:
            at = buf.tell()
            stream_id = buf.pull_uint_var()
            buf.seek(at)
            gateway.epochs.setdefault((id(self), stream_id), set()).add(context.epoch)
        return original(self, context, frame_type, buf)

    monkeypatch.setattr(QuicConnection, "_handle_stream_frame", spy)


def _free(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["FakeGateway", "Reply", "Seen", "default_app", "spy_on_stream_epochs", "Epoch"]


class running:
    """`async with running(tmp_path) as gw:` a FakeGateway for one test."""

    def __init__(self, tls_dir: Path, app: Callable[[Seen], Reply] = default_app) -> None:
        self.gateway = FakeGateway(tls_dir, app)

    async def __aenter__(self) -> FakeGateway:
        return await self.gateway.start()

    async def __aexit__(self, *exc) -> None:
        await self.gateway.close()


def client_kwargs(gw: FakeGateway, tmp_path: Path, **extra) -> dict:
    """Arguments for mobile.Client pointing at `gw` (trusting its self-signed cert)."""
    kw = dict(api_key="k", h3_port=gw.h3_port, ca_file=str(gw.cert), ticket_dir=tmp_path / "tickets",
              migration_check_s=None)
    kw.update(extra)
    return kw
