"""The real stack (Redis, two zones of edge + Triton core, gateway), started once per session.

It runs on its own loopback addresses and free ports, so it never collides with a `make up`
stack on the same machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy.settings import DEFAULT_TOPOLOGY

API_KEY = "mk-test-" + "x" * 16


@dataclass(frozen=True)
class Stack:
    http_url: str
    h3_host: str
    h3_port: int
    api_key: str
    var_dir: Path
    topology: dict


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meridian(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    var = tmp_path_factory.mktemp("stack")
    topo = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    topo["gateway"]["http1"]["port"] = free_port()
    topo["gateway"]["http3"]["port"] = free_port(socket.SOCK_DGRAM)
    topo["gateway"]["https"]["port"] = free_port()
    topo["redis"]["port"] = free_port()
    for i, zone in enumerate(topo["zones"]):
        zone["address"] = f"127.0.{31 + i}.1"
    path = var / "topology.yaml"
    path.write_text(yaml.safe_dump(topo))
    env = {**os.environ, "MERIDIAN_API_KEY": API_KEY}
    built = meridian("models", env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    up = meridian("up", "--detach", "--topology", str(path), "--var-dir", str(var), env=env)
    if up.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (var / "logs").glob("*.log"))
        pytest.fail(f"meridian up failed:\n{up.stdout}\n{up.stderr}\n{logs}")
    g = topo["gateway"]
    yield Stack(f"http://127.0.0.1:{g['http1']['port']}", "127.0.0.1", g["http3"]["port"], API_KEY, var, topo)
    meridian("down", "--var-dir", str(var), env=env, timeout=120)
