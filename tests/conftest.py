"""Session-wide fixtures shared by every test folder.

`stack` is the real stack (Redis, two zones of edge + Triton core, gateway), started once per
session on its own loopback addresses and free ports, so it never collides with a `make up`
stack on the same machine.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# Without a GPU the Triton kernels run under the interpreter, which must be chosen before triton
# is first imported, and any test folder may import it first (through `kernels`).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from deploy.launcher import free_port
from deploy.settings import DEFAULT_TOPOLOGY


class _Unretrieved(logging.Handler):
    """asyncio's reports of task failures nobody retrieved (made from a finalizer, whenever the
    collector runs: in CPython 3.11 one that ran during a compile broke it, in another test)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "never retrieved" in record.getMessage():
            self.reports.append(self.format(record))


@pytest.fixture(scope="module", autouse=True)
def no_unretrieved_task_failures():
    """Every module leaves no task whose failure nobody retrieved."""
    handler = _Unretrieved()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
        gc.collect()
    finally:
        logger.removeHandler(handler)
    assert not handler.reports, "\n".join(handler.reports[:3])


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where `make models` puts heavy artefacts (ONNX exports, generated checkpoints)."""
    root = Path(os.environ.get("MERIDIAN_CACHE", Path.home() / ".cache" / "meridian"))
    root.mkdir(parents=True, exist_ok=True)
    return root


class RedisServer:
    """A real redis-server on a loopback port; tests may stop it and start it again."""

    def __init__(self, port: int, data: Path) -> None:
        self.port, self.data = port, data
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from deploy.launcher import redis_server_binary

        self.proc = subprocess.Popen(
            [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real Redis server on a free loopback port, for the whole session."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()

API_KEY = "mk-test-" + "x" * 16


@dataclass(frozen=True)
class Stack:
    http_url: str
    h3_host: str
    h3_port: int
    api_key: str
    var_dir: Path
    topology: dict
    https_port: int = 0
    cert: Path | None = None


def meridian(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `meridian` CLI of this checkout."""
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
        meridian("down", "--var-dir", str(var), env=env, timeout=120)
        pytest.fail(f"meridian up failed:\n{up.stdout}\n{up.stderr}\n{logs}")
    g = topo["gateway"]
    yield Stack(f"http://127.0.0.1:{g['http1']['port']}", "127.0.0.1", g["http3"]["port"], API_KEY, var, topo,
                https_port=g["https"]["port"], cert=var / "tls" / "cert.pem")
    meridian("down", "--var-dir", str(var), env=env, timeout=120)
