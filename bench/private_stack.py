"""A private stack for the gateway benchmarks: Redis, one edge-only zone and the gateway, on free ports."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.launcher import LocalStack, free_port, resolve_topology  # noqa: E402
from deploy.settings import DEFAULT_TOPOLOGY, Settings  # noqa: E402


def start_stack(var: Path, models: tuple[str, ...], progress: Callable[[str], None]) -> tuple[LocalStack, dict]:
    """The local topology cut down to its first zone's edge serving `models`, started under `var`."""
    raw = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    raw["gateway"]["http1"]["port"] = free_port()
    raw["gateway"]["http3"]["port"] = free_port(socket.SOCK_DGRAM)
    raw["gateway"]["https"] = {"host": "127.0.0.1", "port": 0}
    raw["redis"]["port"] = free_port()
    zone = raw["zones"][0]
    zone.update({"address": "127.0.61.1", "core": None})
    raw["zones"] = [zone]
    raw["models"] = [m for m in raw["models"] if m["name"] in models]
    # A limit far above the load: every request pays for the shared rate limiter's Redis round trip,
    # as a deployment with tenant limits does, without ever being refused.
    raw["limits"] = {"default": {"requests_per_second": 1_000_000}}
    path = var / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = Settings.resolve(topology=str(path), var_dir=str(var))
    stack = LocalStack(settings, resolve_topology(settings))
    stack.start(progress=progress)
    return stack, raw
