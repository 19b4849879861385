"""The gateway process: upstreams from the topology, the pipeline, and both listeners."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import ssl
from pathlib import Path

import msgspec

from gateway import logs, tracing
from gateway.app import Gateway
from gateway.config import Tier, Topology, Zone, load_topology
from gateway.core_client import CoreUpstream
from gateway.edge_client import EdgeUpstream
from gateway.http1 import Http1Listener
from gateway.http3 import Http3Listener
from gateway.outliers import EjectionPolicy
from gateway.redis_link import RedisLink
from gateway.replicas import Resolver, fixed, resolve
from gateway.tls import CertificateReloader, ensure_self_signed
from gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("meridian.gateway")


def build_upstreams(topology: Topology) -> list[Upstream]:
    """One upstream per zone and tier the topology lists."""
    core_models = [m.name for m in topology.models if m.tier == "core"]
    ejection = EjectionPolicy.of(topology.routing)
    upstreams: list[Upstream] = []
    for zone in topology.zones:
        if zone.edge is not None:
            host, resolver = _where(zone, "edge")
            upstreams.append(EdgeUpstream(
                zone.name, host, zone.edge.port,
                max_in_flight=topology.routing.embed_rpcs_in_flight, max_inputs=topology.routing.embed_inputs_per_rpc,
                resolve_interval_s=topology.routing.resolve_interval_s, resolver=resolver, ejection=ejection,
            ))
        if zone.core is not None:
            host, resolver = _where(zone, "core")
            upstreams.append(CoreUpstream(
                zone.name, host, zone.core.grpc_port, core_models,
                resolve_interval_s=topology.routing.resolve_interval_s, resolver=resolver, ejection=ejection,
            ))
    return upstreams


def _where(zone: Zone, tier: Tier) -> tuple[str, Resolver]:
    """The name the tier's replicas go by, and how it is resolved: a fixed list of `hosts` is
    its own answer; a name (or the zone's address) is looked up."""
    endpoint = zone.endpoint(tier)
    if endpoint.hosts:
        return ",".join(endpoint.hosts), fixed(list(endpoint.hosts))
    return endpoint.host or zone.address, resolve


async def run(topology: Topology, stop: asyncio.Event) -> None:
    """Serve until `stop` is set."""
    cfg = topology.gateway
    pool = UpstreamPool(build_upstreams(topology), topology.routing)
    redis = RedisLink(topology.redis)
    gateway = Gateway(topology, pool, redis=redis)
    await pool.check_once()
    pool.start()
    ensure_self_signed(Path(cfg.tls.cert), Path(cfg.tls.key))
    h3 = Http3Listener(gateway, cert=cfg.tls.cert, key=cfg.tls.key)
    await h3.start(cfg.http3.host, cfg.http3.port)
    h1 = Http1Listener(gateway, h3_port=h3.port)
    await h1.start(cfg.http1.host, cfg.http1.port)
    listeners = [h1]
    contexts = []
    if cfg.https.port:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cfg.tls.cert, cfg.tls.key)
        https = Http1Listener(gateway, h3_port=h3.port)
        await https.start(cfg.https.host, cfg.https.port, tls=tls)
        listeners.append(https)
        contexts.append(tls)
    certificates = CertificateReloader(cfg.tls.cert, cfg.tls.key, quic=[h3.quic_configuration], contexts=contexts)
    certificates.start(cfg.tls.reload_interval_s)
    # What startup made lives as long as the process: frozen out of the collector, a full
    # collection scans only what serving made since, not the 70k objects of the imports (a 20 ms
    # pause on the 2-core machines, taken in the middle of whichever requests were in flight).
    gc.collect()
    gc.freeze()
    log.warning("gateway listening", extra={"http1": f"{cfg.http1.host}:{h1.port}", "http3": f"{cfg.http3.host}:{h3.port}"})
    try:
        await stop.wait()
    finally:
        # Drain: readiness fails first, then every listener stops taking requests and lets those
        # in flight finish (up to drain_timeout_s), all at once so no listener serves on alone.
        gateway.begin_drain()
        grace = cfg.drain_timeout_s
        await asyncio.gather(*(listener.close(grace_s=grace) for listener in listeners), h3.close(grace_s=grace))
        await certificates.close()
        await pool.close()
        await redis.close()


def parser() -> argparse.ArgumentParser:
    """The arguments of `meridian gateway`."""
    p = argparse.ArgumentParser(prog="meridian gateway", description="Run the Meridian gateway.")
    p.add_argument("--topology", required=True, help="topology YAML file")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--access-log", action="store_true", help="one JSON line per request")
    p.add_argument("--region", help="this gateway's own region (overrides the topology's)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`meridian gateway --topology FILE`."""
    cli = parser()
    args = cli.parse_args(argv)
    logs.configure(args.log_level, access_log=args.access_log)
    topology = load_topology(args.topology)
    if args.region:
        if topology.region(args.region) is None:
            cli.error(f"--region {args.region} is not a region of {args.topology}")
        topology = msgspec.structs.replace(topology, gateway=msgspec.structs.replace(topology.gateway, region=args.region))
    tracing.configure(topology.tracing)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    asyncio.run(_main(topology))
    return 0


async def _main(topology: Topology) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run(topology, stop)
