"""The gateway and core images, run with podman beside the session's stack: each answers as the
process it packages does. (The edge-node image has its own test in tests/edge/test_integration.py.)
Skipped where podman or the image is missing (`make gateway-image`, `make core-image`)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from deploy.launcher import free_port
from gateway.core_client import CoreChannel
from gateway.upstreams import GenerateCall
from tests.support.h3 import h3_client
from tests.support.podman import image_unavailable, logs, podman

pytestmark = pytest.mark.integration

GATEWAY_IMAGE = os.environ.get("MERIDIAN_GATEWAY_IMAGE", "localhost/meridian-gateway:latest")
CORE_IMAGE = os.environ.get("MERIDIAN_CORE_IMAGE", "localhost/meridian-core:latest")
EMBED, CORE_MODEL = "all-minilm-l6-v2", "meridian-moe-mini"
NO_STORE = {"cache-control": "no-store"}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return 0


async def _wait_for(url: str, timeout: float, name: str) -> None:
    """Until `url` answers 200; a container that exits meanwhile fails at once, with its logs."""
    deadline = time.monotonic() + timeout
    while _status(url) != 200:
        running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        assert running == "true", f"the container exited:\n{logs(name)}"
        assert time.monotonic() < deadline, f"{url} not ready within {timeout:.0f} s:\n{logs(name)}"
        await asyncio.sleep(0.5)


def _readable_copy(files: list[Path], dest: Path) -> Path:
    """Copies the container's unprivileged user can read (the stack's TLS key is private to us)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)
        (dest / f.name).chmod(0o644)
    dest.chmod(0o755)
    return dest


def _gateway_files(stack, dest: Path) -> tuple[Path, Path, int, int]:
    """(topology, TLS folder, HTTP/1.1 port, HTTP/3 port) for a second gateway: the process
    gateway's own topology (with the local key's hash), on ports of its own."""
    topo = yaml.safe_load((stack.var_dir / "run" / "topology.yaml").read_text())
    http1, http3 = free_port(), free_port(socket.SOCK_DGRAM)
    topo["gateway"].update(
        http1={"host": "127.0.0.1", "port": http1}, http3={"host": "127.0.0.1", "port": http3},
        https={"host": "127.0.0.1", "port": 0},
        tls={"cert": "/etc/meridian/tls/cert.pem", "key": "/etc/meridian/tls/key.pem"},
    )
    tls = _readable_copy([stack.var_dir / "tls" / "cert.pem", stack.var_dir / "tls" / "key.pem"], dest / "tls")
    topology = dest / "topology.yaml"
    topology.write_text(yaml.safe_dump(topo))
    topology.chmod(0o644)
    return topology, tls, http1, http3


async def _answers(port: int, api_key: str) -> tuple[np.ndarray, str, str]:
    """(embedding vectors, greedy chat text, tier) from the gateway on this HTTP/3 port; its
    refusal of an empty input checked on the way."""
    embed = {"model": EMBED, "input": ["a container in front", "東京タワー"]}
    chat = {"model": CORE_MODEL, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 12, "temperature": 0}
    async with h3_client("127.0.0.1", port, api_key) as client:
        e = await client.post("/v1/embeddings", json=embed, headers=NO_STORE)
        c = await client.post("/v1/chat/completions", json=chat, headers=NO_STORE)
        bad = await client.post("/v1/embeddings", json={"model": EMBED, "input": [""]})
    assert e.status == 200 and c.status == 200, (port, e.body, c.body)
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error", (port, bad.body)
    vectors = np.array([d["embedding"] for d in e.json()["data"]], dtype=np.float32)
    return vectors, c.json()["choices"][0]["message"]["content"], c.headers["x-meridian-tier"]


def _http1_status(port: int, api_key: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            assert EMBED in {m["id"] for m in json.loads(r.read())["data"]}
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


async def test_gateway_container_answers_like_the_process_gateway(stack, tmp_path: Path) -> None:
    reason = image_unavailable(GATEWAY_IMAGE, "gateway-image")
    if reason:
        pytest.skip(reason)
    topology, tls, http1, http3 = _gateway_files(stack, tmp_path)
    name = f"meridian-gateway-test-{os.getpid()}"
    started = podman("run", "-d", "--init", "--network=host", "--name", name,
                     "-v", f"{topology}:/etc/meridian/topology.yaml:ro", "-v", f"{tls}:/etc/meridian/tls:ro",
                     GATEWAY_IMAGE)
    assert started.returncode == 0, started.stderr
    try:
        await _wait_for(f"http://127.0.0.1:{http1}/readyz", 60, name)
        health = podman("healthcheck", "run", name)
        assert health.returncode == 0, health.stdout + health.stderr
        user = podman("exec", name, "id", "-u")
        assert user.stdout.strip() not in ("", "0"), "the gateway must not run as root"
        # Over HTTP/3, greedy, from the same zones: the same vectors (within float noise) and text.
        want_vectors, want_text, want_tier = await _answers(stack.h3_port, stack.api_key)
        vectors, text, tier = await _answers(http3, stack.api_key)
        np.testing.assert_allclose(vectors, want_vectors, atol=1e-5)
        assert (text, tier) == (want_text, want_tier) and tier == "core"
        # HTTP/1.1 too, where a wrong key is refused as by the process gateway.
        assert _http1_status(http1, stack.api_key) == 200
        assert _http1_status(http1, "not-a-key") == 401
    finally:
        stopped = podman("stop", "-t", "35", name, timeout=60)
        podman("rm", "-f", name)
    assert stopped.returncode == 0, stopped.stderr


def _free_here(*ports: int) -> bool:
    """Whether 127.0.0.1 can bind every one of these TCP ports now."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


async def _greedy_tokens(host: str, grpc_port: int, prompt: str) -> list[int]:
    channel = CoreChannel(host, grpc_port, [CORE_MODEL])
    call = GenerateCall(model=CORE_MODEL, prompt=prompt, max_tokens=16, temperature=0.0, stream=True)
    tokens: list[int] = []
    async for chunk in channel.generate(call, timeout=60):
        tokens.extend(chunk.token_ids)
    return tokens


async def test_core_container_generates_what_the_process_core_generates(stack, cache_dir: Path) -> None:
    reason = image_unavailable(CORE_IMAGE, "core-image")
    if reason:
        pytest.skip(reason)
    checkpoints = cache_dir / "core"
    # The image's health check asks 127.0.0.1:8000, Triton's default: take the defaults when free.
    defaults = _free_here(8000, 8001, 8002)
    http, grpc, metrics = (8000, 8001, 8002) if defaults else (free_port(), free_port(), free_port())
    name = f"meridian-core-test-{os.getpid()}"
    started = podman("run", "-d", "--init", "--network=host", "--name", name, "--shm-size", "256m",
                     "-v", f"{checkpoints}:/models/core:ro", CORE_IMAGE,
                     "--checkpoint", f"/models/core/{CORE_MODEL}", "--device", "cpu", "--threads", "1",
                     "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
                     "--metrics-port", str(metrics))
    assert started.returncode == 0, started.stderr
    try:
        await _wait_for(f"http://127.0.0.1:{http}/v2/health/ready", 180, name)
        if defaults:
            health = podman("healthcheck", "run", name)
            assert health.returncode == 0, health.stdout + health.stderr
        user = podman("exec", name, "id", "-u")
        assert user.stdout.strip() not in ("", "0"), "the core must not run as root"
        zone_a = stack.topology["zones"][0]
        for prompt in ("The container", "Once upon a time, in a land"):
            want = await _greedy_tokens(zone_a["address"], zone_a["core"]["grpc_port"], prompt)
            got = await _greedy_tokens("127.0.0.1", grpc, prompt)
            assert got == want and len(got) == 16, prompt
    finally:
        stopped = podman("stop", "-t", "30", name, timeout=60)
        podman("rm", "-f", name)
    assert stopped.returncode == 0, stopped.stderr
