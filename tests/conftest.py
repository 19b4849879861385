"""Session-wide fixtures shared by every test folder."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = RedisServer(port, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
