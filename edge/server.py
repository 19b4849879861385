"""The edge worker process: gRPC (grpclib) with the Edge service and grpc.health.v1 beside it.

`python -m edge.server --port 50051 --model all-minilm-l6-v2=~/.cache/meridian/edge/all-minilm-l6-v2`
Health reports NOT_SERVING while models load, SERVING once they are loaded, and NOT_SERVING again
on SIGTERM/SIGINT, when the worker finishes the requests it has, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grpclib.health.service import Health
from grpclib.server import Server

from edge.config import LOG_LEVELS, EdgeConfig
from edge.logs import configure_logging, get_logger
from edge.registry import load_models
from edge.service import EdgeService
from edge.validation import EmbedLimits


class EdgeServer:
    """One running worker: listening socket, gRPC server, service, models and inference threads."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="edge-infer")
        limits = EmbedLimits(config.max_batch_inputs, config.max_input_chars)
        self.service = EdgeService(config.zone, limits, self.executor)
        self.health = Health({self.service: [self.service.health]})
        self._server: Server | None = None
        self._socket: socket.socket | None = None
        self._log = get_logger()

    @property
    def port(self) -> int:
        """The bound port (the real one when the config asked for port 0)."""
        if self._socket is None:
            raise RuntimeError("server is not started")
        return int(self._socket.getsockname()[1])

    async def start(self) -> None:
        """Listen (health answers NOT_SERVING), load the models off the loop, then report SERVING."""
        self._socket = _bind(self.config.host, self.config.port)
        self._server = Server([self.service, self.health])
        await self._server.start(sock=self._socket)
        loop = asyncio.get_running_loop()
        try:
            models = await loop.run_in_executor(
                self.executor, load_models, self.config.models, self.config.threads
            )
        except BaseException:
            await self._close()
            raise
        self.service.ready(models)
        if self.config.port_file is not None:
            _write_atomically(self.config.port_file, f"{self.port}\n")
        self._log.info(
            "serving",
            extra={
                "fields": {
                    "host": self.config.host,
                    "port": self.port,
                    "zone": self.config.zone,
                    "models": sorted(models),
                }
            },
        )

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, let in-flight requests finish (bounded), then close."""
        self.service.begin_drain()
        drained = await self.service.wait_idle(self.config.drain_timeout_s)
        if not drained:
            self._log.warning(
                "drain timed out; cancelling requests still running",
                extra={"fields": {"timeout_s": self.config.drain_timeout_s}},
            )
        await self._close()
        self._log.info("stopped", extra={"fields": {"zone": self.config.zone, "drained": drained}})

    async def _close(self) -> None:
        """Close the gRPC server (cancelling what is left) and the inference threads."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def serve(config: EdgeConfig, stop: asyncio.Event | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT (or until `stop` is set, when given), then drain."""
    loop = asyncio.get_running_loop()
    handle_signals = stop is None
    stop = stop or asyncio.Event()
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    server = EdgeServer(config)
    try:
        await server.start()
        await stop.wait()
        await server.stop()
    finally:
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


def parse_args(argv: list[str] | None = None) -> EdgeConfig:
    """Build an EdgeConfig from command-line flags (exits with a usage message on bad flags)."""
    defaults = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(EdgeConfig)})
    parser = argparse.ArgumentParser(prog="python -m edge.server", description="Meridian edge worker (gRPC).")
    parser.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.port, help="port to bind; 0 picks a free one")
    parser.add_argument("--zone", default=defaults.zone, help="zone name, for logs and error messages")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        required=True,
        help="serve the exported model in DIR as NAME (repeatable)",
    )
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="ONNX Runtime threads per model"
    )
    parser.add_argument("--workers", type=int, default=defaults.workers, help="requests run at once")
    parser.add_argument("--max-batch-inputs", type=int, default=defaults.max_batch_inputs)
    parser.add_argument("--max-input-chars", type=int, default=defaults.max_input_chars)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=defaults.drain_timeout_s,
        help="seconds SIGTERM waits for in-flight requests",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=defaults.log_level)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once SERVING")
    args = parser.parse_args(argv)
    models = {}
    for spec in args.model:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            parser.error(f"--model expects NAME=DIR, got {spec!r}")
        if name in models:
            parser.error(f"--model {name} given twice")
        models[name] = Path(directory).expanduser()
    try:
        return EdgeConfig(
            host=args.host,
            port=args.port,
            zone=args.zone,
            models=models,
            threads=args.threads,
            workers=args.workers,
            max_batch_inputs=args.max_batch_inputs,
            max_input_chars=args.max_input_chars,
            drain_timeout_s=args.drain_timeout,
            log_level=args.log_level,
            port_file=args.port_file,
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run the worker; 0 after a clean drain, 1 if it could not start."""
    config = parse_args(argv)
    log = configure_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except Exception as exc:  # noqa: BLE001 - port taken, model missing or unusable: one JSON line, exit 1
        log.error(
            "failed", extra={"fields": {"error": str(exc), "type": type(exc).__name__, "zone": config.zone}}
        )
        return 1
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket, so the real port is known even for port 0."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` so readers see the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
