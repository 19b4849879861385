"""`python -m edge.healthcheck`: exit 0 when the local edge worker reports SERVING on grpc.health.v1.

The container's HEALTHCHECK runs it. It finds the worker's address and port the way the worker does
(flags, then environment, then the zone's topology entry), so both always agree.
"""

from __future__ import annotations

import asyncio
import os
import sys

from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from edge.server import parse_args

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


async def probe(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether the worker at host:port answers SERVING for the whole server."""
    channel = Channel(WILDCARDS.get(host, host), port)
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=timeout)
        return reply.status == HealthCheckResponse.SERVING
    except Exception:  # noqa: BLE001 - refused, timed out, broken: all mean not healthy
        return False
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 if SERVING, 1 otherwise (Docker's HEALTHCHECK convention)."""
    config = parse_args(argv, os.environ)
    healthy = asyncio.run(probe(config.host, config.port))
    print("SERVING" if healthy else "NOT_SERVING")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
