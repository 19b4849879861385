"""A container HEALTHCHECK over HTTP: exit 0 when the process answers 2xx, 1 otherwise.

The gateway image asks its HTTP/1.1 listener's `/healthz`, found in the topology it serves (so the
check follows the configured port); the core image asks Triton's `/v2/health/ready` at a URL. The
edge image asks grpc.health.v1 instead (`edge.healthcheck`).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import Topology


def check(url: str, timeout_s: float) -> str | None:
    """None when `url` answers 2xx within `timeout_s`, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return str(getattr(err, "reason", err))


def gateway_url(topology: Topology) -> str:
    """The liveness URL of the gateway that serves `topology` (its HTTP/1.1 listener, seen locally)."""
    listener = topology.gateway.http1
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listener.host, listener.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{listener.port}/healthz"


def _topology_url(path: Path) -> str:
    # Imported here: only the gateway's image has the gateway's dependencies (msgspec, yaml).
    from gateway.config import load_topology

    return gateway_url(load_topology(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("url", nargs="?", help="for example http://127.0.0.1:8000/v2/health/ready")
    where.add_argument("--topology", type=Path, help="ask the gateway of this topology file")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    try:
        url = args.url or _topology_url(args.topology)
    except ValueError as err:  # the topology's ConfigError
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    problem = check(url, args.timeout)
    if problem is not None:
        print(f"unhealthy: {url}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
