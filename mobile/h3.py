"""HTTP/3 transport on aioquic: session resumption with 0-RTT for replay-safe requests, migration.

aioquic's `QuicConnection` stays sans-IO; `_H3Protocol` only turns its events into one queue per
request stream. What travels as early data is decided here and only here: a request leaves before
the handshake completes only when it is replay-safe (`HttpRequest.replay_safe`) and a stored ticket
allows 0-RTT; anything else waits for the handshake, so its bytes go in 1-RTT packets.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamReset
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import SessionTicket

from mobile.errors import (
    ConnectError,
    ConnectionRefused,
    EarlyDataRejected,
    HandshakeTimeout,
    ProtocolError,
    TransportError,
)
from mobile.http import HttpRequest, HttpResponse
from mobile.tickets import TicketStore
from mobile.tls import TlsSettings


@dataclass(frozen=True, slots=True)
class _Failed:
    """Put on a stream's queue when the stream can no longer complete."""

    error: TransportError


class _H3Connection(H3Connection):
    """aioquic's HTTP/3 connection, telling us that the server sent GOAWAY.

    aioquic 1.7 skips a GOAWAY's payload unread, so the ID it carries is not known: streams the
    server will not process learn it from their H3_REQUEST_REJECTED reset.
    """

    def __init__(self, quic: QuicConnection, on_goaway: Callable[[], None]) -> None:
        super().__init__(quic)
        self._on_goaway = on_goaway

    def _check_control_frame_type(self, frame_type: int) -> None:
        super()._check_control_frame_type(frame_type)  # called once per frame, as its header is read
        if frame_type == FrameType.GOAWAY:
            self._on_goaway()


class _H3Protocol(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 events sorted into per-stream queues."""

    def __init__(self, quic: QuicConnection, stream_handler=None) -> None:
        super().__init__(quic, stream_handler)
        self.http = _H3Connection(quic, self._goaway)
        self.streams: dict[int, asyncio.Queue] = {}
        self.handshake: asyncio.Future[bool] = self._loop.create_future()
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        self.early_streams: set[int] = set()  # request streams whose bytes left before the handshake
        self.closed_reason: str | None = None
        # The server is shutting down (GOAWAY, or a stream it refused): its streams in flight go on
        # to their end, new requests go on a new connection, and this one closes once idle.
        self.going_away = False

    @property
    def usable(self) -> bool:
        """Open and not going away, so new requests may go on it."""
        return self.closed_reason is None and not self.going_away

    def _goaway(self) -> None:
        self.going_away = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.going_away and not self.streams and self.closed_reason is None:
            _close(self, self._transport)

    @property
    def can_send_early(self) -> bool:
        """Whether data sent now leaves as 0-RTT (a resumed session's early keys are set up)."""
        # aioquic keeps early keys only until the 1-RTT keys exist; no public accessor says so.
        from aioquic.tls import Epoch

        return not self.handshake.done() and self._quic._cryptos[Epoch.ZERO_RTT].send.is_valid()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            if not self.handshake.done():
                self.handshake.set_result(event.early_data_accepted)
            if not event.early_data_accepted:
                # The server dropped our early data unread: the request never ran, say so.
                for stream_id in list(self.early_streams):
                    self._fail(stream_id, EarlyDataRejected("server refused 0-RTT data"))
        elif isinstance(event, ConnectionTerminated):
            self.closed_reason = event.reason_phrase or f"connection closed (error {event.error_code})"
            if not self.handshake.done():
                kind = ConnectionRefused if event.error_code == QuicErrorCode.CONNECTION_REFUSED else ConnectError
                self.handshake.set_exception(kind(f"QUIC handshake failed: {self.closed_reason}"))
            for stream_id in list(self.streams):
                self._fail(stream_id, TransportError(self.closed_reason, sent=True))
        elif isinstance(event, StreamReset):
            # H3_REQUEST_REJECTED: the server did not process it (a gateway draining after its
            # GOAWAY), so it is unsent and safe to retry, on another connection than this one.
            rejected = event.error_code == ErrorCode.H3_REQUEST_REJECTED
            self.going_away = self.going_away or rejected
            self._fail(event.stream_id, TransportError(f"stream reset by server (code {event.error_code})",
                                                       sent=not rejected))
        for h3_event in self.http.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        queue = self.streams.get(getattr(event, "stream_id", -1))
        if queue is not None:
            queue.put_nowait(event)

    def _fail(self, stream_id: int, error: TransportError) -> None:
        queue = self.streams.get(stream_id)
        if queue is not None:
            queue.put_nowait(_Failed(error))

    def _forget(self, stream_id: int) -> bool:
        """Done with a stream; False when it was done already."""
        known = self.streams.pop(stream_id, None) is not None
        self.early_streams.discard(stream_id)
        self._close_if_idle()
        return known

    def send_request(self, request: HttpRequest, authority: str) -> tuple[int, bool]:
        """Write the request on a new stream; returns (stream id, whether it went as 0-RTT)."""
        if self.closed_reason is not None:  # closed while the request waited for the handshake
            raise TransportError(f"connection closed before the request left: {self.closed_reason}", sent=False)
        stream_id = self._quic.get_next_available_stream_id()
        early = not self.handshake.done()
        self.streams[stream_id] = asyncio.Queue()
        headers = [(b":method", request.method.encode()), (b":scheme", b"https"),
                   (b":authority", authority.encode()), (b":path", request.path.encode())]
        headers += [(k.encode(), v.encode()) for k, v in request.headers.items()]
        if request.body:
            headers.append((b"content-length", str(len(request.body)).encode()))
        self.http.send_headers(stream_id, headers, end_stream=not request.body)
        if request.body:
            self.http.send_data(stream_id, request.body, end_stream=True)
        if early:
            self.early_streams.add(stream_id)
        self.transmit()
        return stream_id, early

    async def read_headers(self, stream_id: int) -> tuple[int, dict[str, str], bool]:
        """(status, headers, stream ended) of a response."""
        event = await self._next(stream_id)
        if not isinstance(event, HeadersReceived):
            raise ProtocolError("response did not start with headers", sent=True)
        status, headers = 0, {}
        for k, v in event.headers:
            if k == b":status":
                status = int(v)
            else:
                headers[k.decode().lower()] = v.decode(errors="replace")
        if not 100 <= status <= 599:
            raise ProtocolError(f"bad :status {status}", sent=True)
        return status, headers, event.stream_ended

    async def read_body(self, stream_id: int) -> AsyncIterator[bytes]:
        """The DATA of a response stream until it ends (trailers are ignored)."""
        while True:
            event = await self._next(stream_id)
            if isinstance(event, DataReceived) and event.data:
                yield event.data
            if event.stream_ended:
                self._forget(stream_id)
                return

    async def _next(self, stream_id: int) -> H3Event:
        item = await self.streams[stream_id].get()
        if isinstance(item, _Failed):
            self._forget(stream_id)
            raise item.error
        return item

    def cancel(self, stream_id: int) -> None:
        """Abandon a request: reset our side, ask the server to stop sending (so it stops generating)."""
        if stream_id not in self.streams:
            return
        if self.closed_reason is None:
            try:
                self._quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
            except Exception:  # noqa: BLE001 - the send side may already be finished
                pass
            try:
                self._quic.stop_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
            except Exception:  # noqa: BLE001 - the receive side may already be finished
                pass
            self.transmit()
        self._forget(stream_id)  # last, since it may close a connection going away


class H3Transport:
    """HTTP/3 to one server, over one QUIC connection that is reopened (resumed) when it dies."""

    protocol = "h3"

    def __init__(self, host: str, port: int, *, tls: TlsSettings, tickets: TicketStore | None = None,
                 handshake_timeout: float = 3.0, idle_timeout: float = 60.0, server_name: str | None = None,
                 migration_check_s: float | None = 2.0) -> None:
        self.host, self.port = host, port
        self.server = f"{host}:{port}"
        self._tls = tls
        self._tickets = tickets
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._server_name = server_name or host
        self._migration_check_s = migration_check_s
        self._proto: _H3Protocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._opening: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._local_ip: str | None = None
        self._files: ThreadPoolExecutor | None = None
        self._early: list[tuple[HttpRequest, asyncio.Future]] = []  # replay-safe requests for the next connection
        self._retiring: set[_H3Protocol] = set()  # going away, streams still running (close themselves)
        self.handshakes = 0  # connections opened (tests and benchmarks read it)

    # -- connection ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether an open connection finished its handshake."""
        p = self._proto
        return p is not None and p.usable and p.handshake.done() and not p.handshake.exception()

    @property
    def connection(self) -> _H3Protocol | None:
        """The current connection (for diagnostics and tests)."""
        return self._proto

    async def _connection(self) -> _H3Protocol:
        """The current connection, opening (and resuming) one if needed; the handshake may be pending."""
        if self._proto is not None and self._proto.usable and not self._failed(self._proto):
            return self._proto
        if self._opening is None or self._opening.done():
            self._opening = asyncio.get_running_loop().create_task(self._open())
        return await asyncio.shield(self._opening)

    @staticmethod
    def _failed(proto: _H3Protocol) -> bool:
        return proto.handshake.done() and not proto.handshake.cancelled() and proto.handshake.exception() is not None

    async def _open(self) -> _H3Protocol:
        loop = asyncio.get_running_loop()
        self._retire_or_drop()
        try:
            infos = await _resolve(self.host, self.port)
        except OSError as exc:
            raise ConnectError(f"cannot resolve {self.host}: {exc}") from None
        family, _, _, _, addr = infos[0]
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=self._server_name,
                                   idle_timeout=self._idle_timeout)
        self._tls.apply(config)
        ticket = None
        if self._tickets is not None:
            # Read now (small), delete in the background: tickets are single use, and the unlink
            # must not delay the first flight.
            ticket = self._tickets.get(self.server)
            self._file_op(self._tickets.discard, self.server)
        config.session_ticket = ticket
        quic = QuicConnection(configuration=config, session_ticket_handler=self._new_ticket)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            transport, proto = await loop.create_datagram_endpoint(lambda: _H3Protocol(quic), sock=sock)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot open a UDP socket: {exc}") from None
        self._proto, self._transport = proto, transport
        self._remote = addr
        self.handshakes += 1
        proto.connect(addr, transmit=False)
        # Replay-safe requests that waited for this connection leave now, in the same flight as the
        # ClientHello: waiting one more loop turn could let the handshake finish first on a fast path.
        early, self._early = self._early, []
        for request, sent in early:
            if proto.can_send_early and not sent.done():
                sent.set_result(proto.send_request(request, self._authority()))
        proto.transmit()
        if ticket is not None:
            proto.handshake.add_done_callback(lambda f, t=ticket: self._restore_ticket(f, t))
        if self._migration_check_s and (self._watcher is None or self._watcher.done()):
            self._watcher = loop.create_task(self._watch_local_address())
        return proto

    def _file_op(self, fn, *args) -> None:
        """Run a ticket file operation off the event loop (fsync on a phone's flash can take tens of
        ms), on one thread so that a delete and a later write keep their order."""
        if self._files is None:
            self._files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meridian-tickets")
        self._files.submit(fn, *args)

    def _new_ticket(self, ticket: SessionTicket) -> None:
        if self._tickets is not None:
            self._file_op(self._tickets.put, self.server, ticket)

    def _restore_ticket(self, handshake: asyncio.Future, ticket: SessionTicket) -> None:
        # A handshake that never reached the server did not spend the ticket: keep it for next time.
        if self._tickets is not None and (handshake.cancelled() or handshake.exception() is not None):
            store = self._tickets
            self._file_op(lambda: store.get(self.server) is None and store.put(self.server, ticket))

    async def connect(self) -> None:
        """Open a connection if needed and wait for its handshake (HandshakeTimeout after the limit)."""
        proto = await self._connection()
        try:
            await asyncio.wait_for(asyncio.shield(proto.handshake), self._handshake_timeout)
        except asyncio.TimeoutError:
            if self._proto is proto:
                self._drop()
            raise HandshakeTimeout(f"QUIC handshake with {self.server} took over {self._handshake_timeout:g} s") from None

    def _retire_or_drop(self) -> None:
        """Make way for a new connection: one the server is draining keeps serving its streams in
        flight (a long generation) until they end, any other is closed."""
        self._retiring = {p for p in self._retiring if p.closed_reason is None}
        proto = self._proto
        if proto is not None and proto.going_away and proto.closed_reason is None and proto.streams:
            self._retiring.add(proto)
            self._proto = self._transport = None
        else:
            self._drop()

    def _drop(self) -> None:
        """Forget the current connection, closing it."""
        proto, transport = self._proto, self._transport
        self._proto = self._transport = None
        _close(proto, transport)

    # -- requests -----------------------------------------------------------------------------

    def early_data_possible(self, request: HttpRequest) -> bool:
        """Whether `request` would go out as 0-RTT data right now."""
        p = self._proto
        return request.replay_safe and p is not None and p.usable and p.can_send_early

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Send on the current connection; early only when replay-safe, else after the handshake."""
        sent: asyncio.Future | None = None
        if request.replay_safe and (self._proto is None or not self._proto.usable or self._failed(self._proto)):
            sent = asyncio.get_running_loop().create_future()
            self._early.append((request, sent))
        try:
            proto = await self._connection()
        except BaseException:
            if sent is not None and sent.done() and not sent.cancelled() and self._proto is not None:
                self._proto.cancel(sent.result()[0])  # it left already: reset it rather than leak it
            raise
        finally:
            if sent is not None and not sent.done():
                sent.cancel()
                self._early = [(r, f) for r, f in self._early if f is not sent]
        if sent is not None and not sent.cancelled():
            stream_id, early = sent.result()
        else:
            if not proto.handshake.done() and not (request.replay_safe and proto.can_send_early):
                await self.connect()
                proto = await self._connection()
            stream_id, early = proto.send_request(request, self._authority())
        try:
            status, headers, ended = await proto.read_headers(stream_id)
        except BaseException:
            proto.cancel(stream_id)
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                if not ended:
                    async for chunk in proto.read_body(stream_id):
                        yield chunk
            finally:
                proto.cancel(stream_id)  # left early (break, error, collected): STOP_SENDING + reset

        async def close() -> None:
            proto.cancel(stream_id)  # no-op once the stream ended

        return HttpResponse(status, headers, body(), "h3", early_data=early, on_close=close)

    def _authority(self) -> str:
        return self._server_name if self.port == 443 else f"{self._server_name}:{self.port}"

    # -- migration ----------------------------------------------------------------------------

    async def migrate(self, local_host: str | None = None) -> bool:
        """Move the open connection to a new local socket (new address or port), keeping its streams.

        This is what a phone does when it leaves Wi-Fi for cellular: the QUIC connection survives,
        the server validates the new path. Returns False when there is no ready connection to move.
        """
        proto, old = self._proto, self._transport
        if proto is None or old is None or not self.ready:
            return False
        loop = asyncio.get_running_loop()
        family = old.get_extra_info("socket").family
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((local_host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
            new, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)  # re-points proto
        except OSError:
            sock.close()
            return False
        old.set_protocol(asyncio.DatagramProtocol())  # the old socket's close must not end the connection
        old.close()
        self._transport = new
        # A fresh connection ID on the new path, so an observer cannot link the two paths.
        proto._quic.change_connection_id()
        proto.transmit()
        try:
            await asyncio.wait_for(proto.ping(), self._handshake_timeout)
        except (asyncio.TimeoutError, ConnectionError):
            return False
        return True

    def local_address(self) -> tuple[str, int] | None:
        """The local (address, port) of the current connection's socket."""
        if self._transport is None:
            return None
        return self._transport.get_extra_info("sockname")[:2]

    async def _watch_local_address(self) -> None:
        """Migrate when the route to the server starts from another local address (Wi-Fi <-> cellular)."""
        while True:
            await asyncio.sleep(self._migration_check_s)
            if self._proto is None:
                continue
            ip = _route_source(self._remote)
            if ip is not None and self._local_ip is not None and ip != self._local_ip:
                await self.migrate(ip)
            self._local_ip = ip

    async def aclose(self) -> None:
        """Close the connection (and any still finishing streams after a GOAWAY)."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        proto, transport = self._proto, self._transport
        self._drop()
        for retiring in self._retiring:
            _close(retiring, retiring._transport)
        if proto is not None:
            try:
                await asyncio.wait_for(proto.wait_closed(), 0.5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing best effort
                pass
        if transport is not None:
            transport.close()
        if self._files is not None:
            self._files.shutdown(wait=True)  # a ticket being written is kept
            self._files = None


def _close(proto: _H3Protocol | None, transport: asyncio.DatagramTransport | None) -> None:
    """Close a connection now; its streams fail as sent (they may have run)."""
    if proto is not None:
        if not proto.handshake.done():
            proto.handshake.set_exception(ConnectError("connection abandoned"))
        if proto.closed_reason is None:
            proto.closed_reason = "closed by client"
            proto.close()
        for stream_id in list(proto.streams):
            proto._fail(stream_id, TransportError("connection closed", sent=True))
    if transport is not None:
        asyncio.get_running_loop().call_later(0.05, transport.close)  # let CONNECTION_CLOSE leave


async def _resolve(host: str, port: int) -> list:
    """getaddrinfo for UDP; an IP literal is resolved inline (the loop's resolver is a thread hop)."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)


def _route_source(remote: tuple) -> str | None:
    """The local address the kernel would send from to reach `remote` (connect() sends nothing on UDP)."""
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(remote[:2])
            return s.getsockname()[0]
    except OSError:
        return None
