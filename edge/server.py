"""The edge worker process: gRPC (grpclib) with the Edge service and grpc.health.v1 beside it.

`python -m edge.server --port 50051 --model all-minilm-l6-v2=~/.cache/meridian/edge/all-minilm-l6-v2 \
    --model edge-small=~/.cache/meridian/edge/edge-small --max-batch 32`
Health reports NOT_SERVING while models load, SERVING once they are loaded, and NOT_SERVING again
on SIGTERM/SIGINT: the worker keeps answering for a short grace period (so health checkers move
traffic away first), then refuses new requests, finishes the ones it has, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import signal
import socket
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grpclib.health.service import Health

from edge.batcher import BatchPolicy
from edge.config import LOG_LEVELS, EdgeConfig
from edge.embedder import Embedder
from edge.grpc_server import Server
from edge.l1cache import L1Cache
from edge.logs import configure_logging, get_logger
from edge.registry import load_models
from edge.service import EdgeService
from edge.topology import zone_edge
from edge.validation import EmbedLimits, GenerateLimits
from edge.wire import EncodedCodec


class EdgeServer:
    """One running worker: listening socket, gRPC server, service, models and inference threads."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="edge-infer")
        limits = EmbedLimits(config.max_batch_inputs, config.max_input_chars)
        policy = BatchPolicy(config.max_batch, config.max_queue_delay_ms / 1000, concurrency=config.workers)
        self.embedder = Embedder(self.executor, policy, L1Cache(config.l1_cache_entries))
        self.service = EdgeService(
            config.zone, limits, self.executor, embedder=self.embedder,
            generate_limits=GenerateLimits(max_prompt_chars=config.max_prompt_chars),
        )
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
        self._server = Server([self.service, self.health], codec=EncodedCodec())
        await self._server.start(sock=self._socket)
        loop = asyncio.get_running_loop()
        try:
            models = await loop.run_in_executor(
                self.executor,
                functools.partial(
                    load_models, self.config.models, self.config.threads,
                    int8=self.config.int8, instances=self.config.workers,
                ),
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
                    "int8": self.config.int8,
                    "max_batch": self.config.max_batch,
                }
            },
        )

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, keep answering for the grace period, refuse new requests, let
        in-flight ones finish (bounded), then close."""
        self.service.begin_drain(refuse_new=False)
        # Requests the gateway sent before its probe saw NOT_SERVING are still served, not refused:
        # a refusal would cost a retry and count against this zone in outlier detection.
        await asyncio.sleep(self.config.drain_grace_s)
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
        await self.embedder.close()
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
        # The loaded models and imports stay for the worker's life: out of the collector's full
        # passes (about 8 ms each here), which would stall the loop thread mid-batch. Here, not in
        # start(): a process that embeds the server keeps its own collector as it was.
        gc.collect()
        gc.freeze()
        await stop.wait()
        await server.stop()
    finally:
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


# Environment variables the CLI reads (the container sets them); flags win over them.
ENVIRONMENT = {
    "MERIDIAN_TOPOLOGY": "topology",
    "MERIDIAN_ZONE": "zone",
    "MERIDIAN_CACHE": "cache_dir",
    "MERIDIAN_EDGE_HOST": "host",
    "MERIDIAN_EDGE_INT8": "int8",
    "MERIDIAN_LOG_LEVEL": "log_level",
}


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Build an EdgeConfig: defaults, then the zone's topology entry, then the environment, then flags."""
    parser = _parser()
    given = vars(parser.parse_args(argv))  # only flags actually given (defaults are suppressed)
    env = {ours: value for name, ours in ENVIRONMENT.items() if (value := (environ or {}).get(name))}
    settings: dict[str, object] = {}
    topology = given.pop("topology", None) or env.pop("topology", None)
    cache_dir = Path(given.pop("cache_dir", None) or env.pop("cache_dir", None) or "~/.cache/meridian").expanduser()
    if "int8" in env:
        env["int8"] = env["int8"].lower() in ("1", "true", "yes")
    settings.update(env)
    if topology:
        zone = given.get("zone") or env.get("zone")
        if not zone:
            parser.error("--topology needs --zone (or MERIDIAN_ZONE) to know which zone's edge to run")
        try:
            entry = zone_edge(Path(topology), str(zone), cache_dir)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"topology {topology}: {exc}")
        settings.update(entry.settings, models=entry.models)
        settings.setdefault("host", entry.host)
    settings.update({k: v for k, v in given.items() if k != "model"})
    if "model" in given:
        settings["models"] = _models(parser, given["model"])
    if not settings.get("models"):
        parser.error("no models: give --model NAME=DIR, or --topology with --zone")
    try:
        return EdgeConfig(**settings)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _parser() -> argparse.ArgumentParser:
    """The worker's flags; every default is suppressed so that unset flags leave lower layers alone."""
    defaults = EdgeConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog="meridian edge", description="Meridian edge worker (gRPC).", argument_default=argparse.SUPPRESS
    )
    add = parser.add_argument
    add("--topology", help="topology YAML: serve the edge of --zone as it describes (env MERIDIAN_TOPOLOGY)")
    add("--cache-dir", help="model cache that topology paths are relative to (env MERIDIAN_CACHE)")
    add("--host", help=f"address to bind (default {defaults['host'].default}, or the zone's address)")
    add("--port", type=int, help="port to bind; 0 picks a free one")
    add("--zone", help="zone name (env MERIDIAN_ZONE)")
    add("--model", action="append", metavar="NAME=DIR", help="serve the exported model in DIR as NAME (repeatable)")
    add("--threads", type=int, help="ONNX Runtime threads per model instance")
    add("--workers", type=int, help="inference threads: batches or generation steps run at once")
    add("--max-batch-inputs", type=int, help="inputs in one Embed request")
    add("--max-input-chars", type=int, help="characters in one Embed input")
    add("--max-prompt-chars", type=int, help="characters in one Generate prompt")
    add("--max-batch", type=int, help="dynamic batching: most inputs in one model call (1: one request at a time)")
    add("--max-queue-delay-ms", type=float,
        help="dynamic batching: how long a queue shorter than the last batch may wait for company (0: never)")
    add("--l1-cache-entries", type=int, help="embeddings kept in the edge-local cache (0: off)")
    add("--int8", action="store_true", help="serve the models' int8 weights (env MERIDIAN_EDGE_INT8=1)")
    add("--drain-timeout", type=float, dest="drain_timeout_s", help="seconds SIGTERM waits for in-flight requests")
    add("--drain-grace", type=float, dest="drain_grace_s",
        help="seconds after SIGTERM that NOT_SERVING is reported while requests are still answered")
    add("--log-level", choices=LOG_LEVELS)
    add("--port-file", type=Path, help="write the bound port here once SERVING")
    return parser


def _models(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, Path]:
    """NAME=DIR flags as a mapping, refusing malformed or repeated names."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            parser.error(f"--model expects NAME=DIR, got {spec!r}")
        if name in models:
            parser.error(f"--model {name} given twice")
        models[name] = Path(directory).expanduser()
    return models


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run the worker; 0 after a clean drain, 1 if it could not start."""
    config = parse_args(argv, os.environ)
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
