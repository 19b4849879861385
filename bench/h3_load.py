"""A closed-loop HTTP/3 load generator for the benchmarks, run as its own process.

It opens `--connections` QUIC connections and keeps `--streams` requests in flight on each: every
stream slot sends its next request as soon as its previous answer ended. It runs on uvloop, and
packets leave once per event-loop iteration, so requests issued together share packets the way a
busy client's do. The same generator loads every server it is pointed at (the gateway, Caddy).

    bench/h3_load.py --port 8443 --path /v1/embeddings --body-file B --header 'authorization: Bearer K'

Handshakes and a warm-up round happen first; then it prints `ready` and waits for a line on stdin,
so the caller can read the server's CPU counters around the measured requests only. At the end
it prints one JSON object: requests, errors, seconds, and every latency in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import ssl
import sys
import time
from pathlib import Path

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

UNIQUE = b"@UNIQUE@"  # replaced by a counter in each request's body under --unique


class LoadClient(QuicConnectionProtocol):
    """One QUIC connection; a future per open stream, resolved with the status when it ends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._open: dict[int, list] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, (StreamReset, ConnectionTerminated)):
            ids = [event.stream_id] if isinstance(event, StreamReset) else list(self._open)
            for stream_id in ids:
                slot = self._open.pop(stream_id, None)
                if slot is not None and not slot[0].done():
                    slot[0].set_result(0)
        for h3_event in self._http.handle_event(event):
            slot = self._open.get(h3_event.stream_id)
            if slot is None:
                continue
            if isinstance(h3_event, HeadersReceived) and not slot[1]:
                slot[1] = int(dict(h3_event.headers).get(b":status", b"0"))
            if h3_event.stream_ended:
                del self._open[h3_event.stream_id]
                slot[0].set_result(slot[1])

    async def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        """The status of one request (0 when the stream or connection broke)."""
        stream_id = self._quic.get_next_available_stream_id()
        slot = [self._loop.create_future(), 0]
        self._open[stream_id] = slot
        self._http.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self._http.send_data(stream_id, body, end_stream=True)
        self._transmit_soon()
        return await slot[0]


def request_headers(args: argparse.Namespace, body_len: int) -> list[tuple[bytes, bytes]]:
    """Pseudo-headers, the caller's headers and content-length."""
    headers = [(b":method", args.method.encode()), (b":scheme", b"https"),
               (b":authority", f"{args.host}:{args.port}".encode()), (b":path", args.path.encode())]
    for h in args.header:
        name, _, value = h.partition(":")
        headers.append((name.strip().lower().encode(), value.strip().encode()))
    if body_len:
        headers.append((b"content-length", str(body_len).encode()))
    return headers


async def drive(clients: list[LoadClient], args: argparse.Namespace, body: bytes, count: int) -> dict:
    """`count` requests over every connection's stream slots; latencies and errors."""
    counter = itertools.count()
    tag = f"{os.getpid()}-{time.monotonic_ns()}-".encode()
    fixed = request_headers(args, len(body))
    latencies: list[float] = []
    errors = 0

    async def slot(client: LoadClient) -> None:
        nonlocal errors
        while (i := next(counter)) < count:
            payload = body.replace(UNIQUE, tag + str(i).encode()) if args.unique else body
            headers = fixed if len(payload) == len(body) else request_headers(args, len(payload))
            started = time.perf_counter()
            status = await client.request(headers, payload)
            latencies.append(time.perf_counter() - started)
            errors += not 200 <= status < 300

    started = time.perf_counter()
    await asyncio.gather(*(slot(c) for c in clients for _ in range(args.streams)))
    return {"requests": count, "errors": errors, "seconds": time.perf_counter() - started, "latencies": latencies}


async def main_async(args: argparse.Namespace) -> None:
    """Connect, warm up, say `ready`, wait for the go line, run, print the result."""
    body = Path(args.body_file).read_bytes() if args.body_file else b""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE, idle_timeout=60.0)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(args.host, args.port, configuration=config, create_protocol=LoadClient))
            for _ in range(args.connections)
        ]
        await drive(clients, args, body, args.warmup)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        result = await drive(clients, args, body, args.requests)
    print(json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--method", default="GET")
    p.add_argument("--header", action="append", default=[], help="'name: value', repeatable")
    p.add_argument("--body-file")
    p.add_argument("--unique", action="store_true", help=f"replace {UNIQUE.decode()} in the body per request")
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--streams", type=int, default=32, help="requests in flight per connection")
    p.add_argument("--requests", type=int, default=2000, help="measured requests")
    p.add_argument("--warmup", type=int, default=200, help="requests before `ready`")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
