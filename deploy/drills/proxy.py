"""A user-space fault-injection proxy: UDP (QUIC) and TCP (gRPC, HTTP) forwards sharing one Fault.

The kernel here has no netem, so latency, jitter, loss, blackholes and resets for drills come from
this proxy. Faults change at run time through a small HTTP control API:
`GET /fault` shows the current one, `PUT /fault` with a JSON body replaces it.

    python -m deploy.drills.proxy --forward tcp:127.0.1.2:50051=127.0.1.1:50051 \\
        --forward udp:127.0.0.1:9443=127.0.0.1:8443 --control 127.0.0.1:9900 --latency-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import struct
from dataclasses import dataclass

from aiohttp import web

from deploy.drills.faults import Fault


class FaultState:
    """The fault every forward of one proxy applies, and the random source for its decisions."""

    def __init__(self, fault: Fault | None = None, seed: int | None = None) -> None:
        self.fault = fault or Fault()
        self.rng = random.Random(seed)
        self.resets: list[asyncio.Event] = []

    def set(self, fault: Fault) -> None:
        self.fault = fault
        if fault.reset:
            for event in self.resets:
                event.set()


# -- UDP ----------------------------------------------------------------------------------------


class _UpstreamUdp(asyncio.DatagramProtocol):
    """One client's socket towards the upstream; replies go back through the listener."""

    def __init__(self, proxy: UdpForward, client: tuple) -> None:
        self.proxy, self.client = proxy, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.proxy.deliver(lambda: self.proxy.listener.sendto(data, self.client))


class UdpForward(asyncio.DatagramProtocol):
    """Datagrams from clients to one upstream and back, each delayed or dropped by the fault."""

    def __init__(self, state: FaultState, upstream: tuple[str, int]) -> None:
        self.state = state
        self.upstream = upstream
        self.listener: asyncio.DatagramTransport | None = None
        self._clients: dict[tuple, _UpstreamUdp] = {}
        self._pending: dict[tuple, list[bytes]] = {}
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport) -> None:
        self.listener = transport

    def datagram_received(self, data: bytes, addr) -> None:
        client = self._clients.get(addr)
        if client is not None and client.transport is not None:
            self.deliver(lambda: client.transport.sendto(data))
            return
        queue = self._pending.setdefault(addr, [])
        queue.append(data)
        if len(queue) == 1:
            self._loop.create_task(self._open(addr))

    async def _open(self, addr) -> None:
        _, proto = await self._loop.create_datagram_endpoint(
            lambda: _UpstreamUdp(self, addr), remote_addr=self.upstream
        )
        self._clients[addr] = proto
        for data in self._pending.pop(addr, []):
            self.deliver(lambda d=data: proto.transport.sendto(d))

    def deliver(self, send) -> None:
        """Send now, later, or never, as the fault says."""
        fault = self.state.fault
        if fault.drops(self.state.rng):
            return
        delay = fault.delay_s(self.state.rng)
        if delay:
            self._loop.call_later(delay, send)
        else:
            send()


# -- TCP ----------------------------------------------------------------------------------------


class TcpForward:
    """Byte streams from clients to one upstream and back, delayed, held or reset by the fault."""

    def __init__(self, state: FaultState, upstream: tuple[str, int]) -> None:
        self.state = state
        self.upstream = upstream

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state.fault.reset:
            _abort(writer)
            return
        reset = asyncio.Event()
        self.state.resets.append(reset)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            self.state.resets.remove(reset)
            return
        # The kernel completed the client's TCP handshake at once; on the path being modelled it
        # takes a round trip, so nothing the client sends may arrive before that.
        handshake_done = asyncio.get_running_loop().time() + 2 * self.state.fault.delay_s(self.state.rng)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, not_before=handshake_done)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        waiter = asyncio.create_task(reset.wait())
        try:
            await _until_done(pipes, waiter)
        finally:
            for task in (*pipes, waiter):
                task.cancel()
            self.state.resets.remove(reset)
            if reset.is_set():
                _abort(writer)
                _abort(up_writer)
            else:
                for w in (writer, up_writer):
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, not_before: float = 0.0) -> None:
        # Chunks keep their order; each leaves `delay` after it arrived, so latency does not
        # stack up into a throughput limit.
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if data is None:
                    return
                while self.state.fault.blackhole:
                    await asyncio.sleep(0.05)
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(65536):
                sent = max(loop.time(), not_before)
                await queue.put((sent + self.state.fault.delay_s(self.state.rng), data))
            await queue.put((0.0, None))
            await sender
            # Pass the half-close on (a client may send its request, shut down writing, then
            # read the reply): the other direction keeps running.
            if writer.can_write_eof():
                try:
                    writer.write_eof()
                except OSError:
                    pass
        finally:
            sender.cancel()


async def _until_done(pipes: list[asyncio.Task], reset: asyncio.Task) -> None:
    """Until both directions reached EOF, one broke (a socket error ends the connection), or a reset came."""
    pending = set(pipes)
    while pending:
        done, _ = await asyncio.wait(pending | {reset}, return_when=asyncio.FIRST_COMPLETED)
        if reset in done:
            return
        if any(task.exception() is not None for task in done):
            return
        pending -= done


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a crashed or resetting peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


# -- the process --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    kind: str  # "tcp" | "udp"
    listen: tuple[str, int]
    upstream: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> Forward:
        """`tcp:LHOST:LPORT=UHOST:UPORT`."""
        try:
            kind, rest = text.split(":", 1)
            listen, upstream = rest.split("=")
            lh, lp = listen.rsplit(":", 1)
            uh, up = upstream.rsplit(":", 1)
            if kind not in ("tcp", "udp"):
                raise ValueError
            return cls(kind, (lh, int(lp)), (uh, int(up)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected tcp|udp:LHOST:LPORT=UHOST:UPORT, got {text!r}") from None


async def start_forwards(state: FaultState, forwards: list[Forward]) -> list:
    """Bind every forward; returns the servers/transports to close."""
    loop = asyncio.get_running_loop()
    opened = []
    for f in forwards:
        if f.kind == "tcp":
            server = await asyncio.start_server(TcpForward(state, f.upstream).handle, *f.listen, reuse_address=True)
            opened.append(server)
        else:
            transport, _ = await loop.create_datagram_endpoint(lambda f=f: UdpForward(state, f.upstream), local_addr=f.listen)
            opened.append(transport)
    return opened


def control_app(state: FaultState) -> web.Application:
    """GET/PUT /fault."""

    async def get_fault(request: web.Request) -> web.Response:
        return web.json_response(state.fault.as_dict())

    async def put_fault(request: web.Request) -> web.Response:
        try:
            state.set(Fault.from_dict(await request.json()))
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
        return web.json_response(state.fault.as_dict())

    app = web.Application()
    app.add_routes([web.get("/fault", get_fault), web.put("/fault", put_fault)])
    return app


async def serve(forwards: list[Forward], control: tuple[str, int] | None, fault: Fault, seed: int | None) -> None:
    """Run until SIGINT/SIGTERM."""
    state = FaultState(fault, seed)
    opened = await start_forwards(state, forwards)
    runner = None
    if control is not None:
        runner = web.AppRunner(control_app(state), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, *control).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for item in opened:
        item.close()
    if runner is not None:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.drills.proxy`."""
    p = argparse.ArgumentParser(prog="meridian proxy", description="Fault-injection proxy (UDP and TCP).")
    p.add_argument("--forward", action="append", type=Forward.parse, required=True, help="tcp|udp:LHOST:LPORT=UHOST:UPORT")
    p.add_argument("--control", help="HOST:PORT of the control API")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    control = None
    if args.control:
        host, port = args.control.rsplit(":", 1)
        control = (host, int(port))
    fault = Fault(latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, loss=args.loss)
    asyncio.run(serve(args.forward, control, fault, args.seed))
    return 0


def set_fault(control_url: str, fault: Fault) -> None:
    """Change a running proxy's fault (a blocking helper for drills and benchmarks)."""
    import urllib.request

    req = urllib.request.Request(
        f"{control_url}/fault", data=json.dumps(fault.as_dict()).encode(), method="PUT",
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


if __name__ == "__main__":
    raise SystemExit(main())

