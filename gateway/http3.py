"""The HTTP/3 listener (aioquic): H3 events in, one `Request` per stream, the `Response` back.

The protocol work stays in aioquic's sans-IO connection; this adapter only gathers a stream's
headers and body, hands the request to the gateway, and writes the answer. Packets are flushed
once per event-loop iteration (aioquic's `_transmit_soon`), never once per response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, H3Stream, MessageError, encode_frame
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated, QuicEvent, StopSendingReceived, StreamReset
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.tls import SessionTicket

from gateway.app import Gateway, body_timeout, header_limit, too_large, too_many_streams
from gateway.errors import GatewayError
from gateway.http import Request, Response


@dataclass(slots=True)
class _Pending:
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    refused: bool = False
    deadline: asyncio.TimerHandle | None = None


class SessionTicketStore:
    """Keeps issued TLS session tickets so returning clients resume with 0-RTT."""

    def __init__(self, limit: int = 10_000) -> None:
        self._tickets: dict[bytes, SessionTicket] = {}
        self._limit = limit

    def add(self, ticket: SessionTicket) -> None:
        if len(self._tickets) >= self._limit:
            self._tickets.pop(next(iter(self._tickets)))
        self._tickets[ticket.ticket] = ticket

    def pop(self, label: bytes) -> SessionTicket | None:
        return self._tickets.pop(label, None)


class _H3Connection(H3Connection):
    """aioquic closes the whole connection on a malformed request (no :path, a content-length its
    DATA does not match); RFC 9114 §4.1.2 makes that a stream error, which spares the other streams."""

    def __init__(self, quic, on_stream_error: Callable[[int], None]) -> None:
        super().__init__(quic)
        self._on_stream_error = on_stream_error
        self._dropped: set[int] = set()

    def _receive_request_or_push_data(self, stream: H3Stream, data: bytes, stream_ended: bool) -> list[H3Event]:
        if stream.stream_id in self._dropped:
            return []
        try:
            return super()._receive_request_or_push_data(stream, data, stream_ended)
        except MessageError:
            self._dropped.add(stream.stream_id)
            self._quic.reset_stream(stream.stream_id, ErrorCode.H3_MESSAGE_ERROR)
            try:
                self._quic.stop_stream(stream.stream_id, ErrorCode.H3_MESSAGE_ERROR)
            except ValueError:  # its receiving side is gone already
                pass
            self._on_stream_error(stream.stream_id)
            return []


class H3GatewayProtocol(QuicConnectionProtocol):
    """One QUIC connection: its HTTP/3 streams become gateway requests."""

    def __init__(self, *args, gateway: Gateway, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = gateway.topology.gateway
        self._gateway = gateway
        self._max_body = cfg.max_body_bytes
        self._max_headers = cfg.max_headers
        self._max_header_bytes = cfg.max_header_bytes
        self._max_streams = cfg.max_streams_per_connection
        self._body_timeout = cfg.body_timeout_s
        self._http: H3Connection | None = None
        self._pending: dict[int, _Pending] = {}
        self._tasks: dict[int, asyncio.Task] = {}
        self._next_stream_id = 0  # the lowest client stream id not seen yet
        self._goaway_id: int | None = None  # set once draining: streams from this id are refused
        self.drain_when_ready = False  # a connection that arrives while the listener drains
        self.refuse = False  # one past the listener's connection limit: closed on its first datagram
        self.on_terminated: Callable[[H3GatewayProtocol], None] = lambda protocol: None

    def datagram_received(self, data: bytes, addr) -> None:
        # Flush at the end of the loop iteration, not per datagram: the ACK for a request then
        # leaves in the same packet as answers produced meanwhile, and a burst of datagrams costs
        # one pass of packet building instead of one per datagram.
        self._quic.receive_datagram(data, addr, now=self._loop.time())
        if self.refuse:
            self.refuse = False
            # A transport close (a frame type given: 0, unknown), which the handshake's packets may
            # carry as it is; an application close there reaches the client as APPLICATION_ERROR.
            self._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED, frame_type=QuicFrameType.PADDING,
                             reason_phrase="connection limit")
        self._process_events()
        self._transmit_soon()

    @property
    def idle(self) -> bool:
        """No request is being received or answered."""
        return not self._pending and not self._tasks

    def drain(self) -> None:
        """GOAWAY: the streams opened so far are served; the client sends later ones elsewhere."""
        if self._http is None:
            self.drain_when_ready = True
            return
        if self._goaway_id is not None:
            return
        self._goaway_id = self._next_stream_id
        # aioquic has no API for it: the frame goes on our control stream (RFC 9114 §5.2).
        frame = encode_frame(FrameType.GOAWAY, encode_uint_var(self._goaway_id))
        self._quic.send_stream_data(self._http._local_control_stream_id, frame)
        self.transmit()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._http = _H3Connection(self._quic, self._cancel)
            if self.drain_when_ready:
                self.drain()
        elif isinstance(event, (StreamReset, StopSendingReceived)):
            # STOP_SENDING is how a client that has sent its whole request cancels the answer
            # (aioquic resets our side of the stream): the handler, and so its generation, ends.
            self._cancel(event.stream_id)
        elif isinstance(event, ConnectionTerminated):
            for stream_id in list(self._tasks):
                self._cancel(stream_id)
            self.on_terminated(self)
        if self._http is not None:
            for h3_event in self._http.handle_event(event):
                self._h3_event_received(h3_event)

    def _h3_event_received(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived) and (event.stream_id in self._pending or event.stream_id in self._tasks):
            # Trailers: nothing of ours needs their fields, but they may carry the end of the request.
            if event.stream_id not in self._pending:
                return
        elif isinstance(event, HeadersReceived) and self._refused_by_goaway(event.stream_id):
            return
        elif isinstance(event, HeadersReceived):
            self._next_stream_id = max(self._next_stream_id, event.stream_id + 4)
            headers = {k.decode().lower(): v.decode(errors="replace") for k, v in event.headers}
            pending = self._pending[event.stream_id] = _Pending(headers)
            length = headers.get("content-length", "")
            size = sum(len(k) + len(v) for k, v in event.headers)
            if len(event.headers) > self._max_headers or size > self._max_header_bytes:
                self._refuse(event.stream_id, header_limit(self._max_headers, self._max_header_bytes))
            elif len(self._tasks) >= self._max_streams:
                self._refuse(event.stream_id, too_many_streams(self._max_streams))
            elif length.isdigit() and int(length) > self._max_body:
                self._refuse(event.stream_id, too_large(self._max_body))
            elif not event.stream_ended:
                pending.deadline = self._loop.call_later(self._body_timeout, self._body_too_slow, event.stream_id)
        elif isinstance(event, DataReceived):
            pending = self._pending.get(event.stream_id)
            if pending is None:
                return
            if not pending.refused:  # a refused request's body is dropped as it arrives
                pending.body += event.data
                if len(pending.body) > self._max_body:
                    self._refuse(event.stream_id, too_large(self._max_body))
        else:
            return
        if event.stream_ended:
            pending = self._pending.pop(event.stream_id, None)
            if pending is not None and pending.deadline is not None:
                pending.deadline.cancel()
            if pending is not None and not pending.refused:
                self._start(event.stream_id, pending)

    def _refused_by_goaway(self, stream_id: int) -> bool:
        """A stream opened after our GOAWAY: rejected unprocessed, so the client may retry it."""
        if self._goaway_id is None or stream_id < self._goaway_id:
            return False
        self._quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
        self._quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_REJECTED)
        self._transmit_soon()
        return True

    def _refuse(self, stream_id: int, error: GatewayError) -> None:
        # Answer at once; the rest of the body is dropped as it arrives.
        pending = self._pending[stream_id]
        pending.refused = True
        pending.body = bytearray()
        if pending.deadline is not None:
            pending.deadline.cancel()
        self._send_whole(stream_id, Response.refusal(error, pending.headers))

    def _body_too_slow(self, stream_id: int) -> None:
        pending = self._pending.get(stream_id)
        if pending is not None and not pending.refused:
            pending.deadline = None
            self._refuse(stream_id, body_timeout(self._body_timeout))

    def _start(self, stream_id: int, pending: _Pending) -> None:
        h = pending.headers
        path, _, query = h.get(":path", "/").partition("?")
        peer = self._quic._network_paths[0].addr[0] if self._quic._network_paths else ""
        request = Request(
            method=h.get(":method", "GET"),
            path=path,
            headers={k: v for k, v in h.items() if not k.startswith(":")},
            body=bytes(pending.body),
            client_ip=peer,
            protocol="h3",
            query=query,
        )
        task = asyncio.get_running_loop().create_task(self._serve(stream_id, request))
        self._tasks[stream_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(stream_id, None))

    async def _serve(self, stream_id: int, request: Request) -> None:
        response = await self._gateway.handle(request)
        if request.method == "HEAD" and response.stream is None:
            # Headers alone, and without content-length (RFC 9110 lets a HEAD answer omit it):
            # aioquic clients check it against the DATA they get and close the connection.
            self._send_headers(stream_id, response, head=True)
            self._transmit_soon()
            return
        if response.stream is None:
            self._send_whole(stream_id, response)
            return
        try:
            self._send_headers(stream_id, response)
            async for chunk in response.stream:
                self._http.send_data(stream_id, chunk, end_stream=False)
                self._transmit_soon()
            self._http.send_data(stream_id, b"", end_stream=True)
            self._transmit_soon()
        finally:
            await response.stream.aclose()

    def _send_whole(self, stream_id: int, response: Response) -> None:
        self._send_headers(stream_id, response)
        self._http.send_data(stream_id, response.body, end_stream=True)
        self._transmit_soon()

    def _send_headers(self, stream_id: int, response: Response, *, head: bool = False) -> None:
        """The answer's HEADERS frame; for HEAD (`head`) it also ends the stream."""
        headers = [(b":status", str(response.status).encode())]
        headers += [(k.encode(), v.encode()) for k, v in response.headers.items()]
        if response.stream is None and not head:
            headers.append((b"content-length", str(len(response.body)).encode()))
        self._http.send_headers(stream_id, headers, end_stream=head)

    def _cancel(self, stream_id: int) -> None:
        pending = self._pending.pop(stream_id, None)
        if pending is not None and pending.deadline is not None:
            pending.deadline.cancel()
        task = self._tasks.pop(stream_id, None)
        if task is not None:
            task.cancel()


class Http3Listener:
    """Serves the gateway over HTTP/3 on one UDP socket."""

    def __init__(self, gateway: Gateway, *, cert: str, key: str) -> None:
        self._gateway = gateway
        self._config = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            max_datagram_frame_size=65536,
            idle_timeout=gateway.topology.gateway.idle_timeout_s,
        )
        self._config.load_cert_chain(cert, key)
        self._tickets = SessionTicketStore()
        self._server: QuicServer | None = None
        self._open: set[H3GatewayProtocol] = set()  # until their ConnectionTerminated
        self._max_connections = gateway.topology.gateway.max_connections
        self._draining = False

    async def start(self, host: str, port: int) -> None:
        """Bind the UDP socket and start accepting connections."""
        self._server = await serve(
            host,
            port,
            configuration=self._config,
            create_protocol=self._connection,
            session_ticket_fetcher=self._tickets.pop,
            session_ticket_handler=self._tickets.add,
        )

    def _connection(self, *args, **kwargs) -> H3GatewayProtocol:
        protocol = H3GatewayProtocol(*args, gateway=self._gateway, **kwargs)
        if self._max_connections and len(self._open) >= self._max_connections:
            protocol.refuse = True  # the client sees CONNECTION_REFUSED and may try another gateway
            return protocol
        protocol.drain_when_ready = self._draining
        protocol.on_terminated = self._open.discard
        self._open.add(protocol)
        return protocol

    @property
    def quic_configuration(self) -> QuicConfiguration:
        """The settings new connections are made with (their certificate reloads in place)."""
        return self._config

    @property
    def open_connections(self) -> int:
        """Connections held now (those refused at the limit not counted)."""
        return len(self._open)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server._transport.get_extra_info("sockname")[1]

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop taking requests (GOAWAY on every connection), give those in flight up to `grace_s`
        to finish, then close the socket and every connection."""
        if self._server is None:
            return
        self._draining = True
        for protocol in list(self._open):
            protocol.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while loop.time() < deadline and not all(p.idle for p in list(self._open)):
            await asyncio.sleep(0.05)
        self._server.close()
