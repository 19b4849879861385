"""The edge in the real stack: edge-small through the gateway over HTTP/3, a rolling restart of both
edge workers under embedding load, and the edge-node container in place of zone-b's worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from deploy.processes import Child
from edge.lm_export import torch_greedy
from edge.runtime.generation import SmallLM
from tests.support.h3 import h3_client
from tests.support.podman import image_unavailable, podman

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EMBED, LM = "all-minilm-l6-v2", "edge-small"
IMAGE = os.environ.get("MERIDIAN_EDGE_IMAGE", "localhost/meridian-edge:latest")
NO_STORE = {"cache-control": "no-store"}  # every request must reach an edge, not the L2 cache


@dataclass
class EdgeProcess:
    """One zone's edge worker as the stack runs it: its pid, command line and address."""

    zone: str
    host: str
    port: int
    pid: int
    argv: list[str]


def find_edge(stack, zone: dict) -> EdgeProcess:
    """The running edge worker of `zone` in this session's stack (found by its unique address)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        if "edge.server" in argv and zone["address"] in argv and zone["name"] in argv:
            return EdgeProcess(zone["name"], zone["address"], zone["edge"]["port"], int(entry.name), argv)
    raise LookupError(f"no edge worker running for {zone['name']}")


async def serving(host: str, port: int) -> bool:
    """grpc.health.v1 says SERVING at host:port."""
    channel = Channel(host, port)
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=1)
        return reply.status == HealthCheckResponse.SERVING
    except Exception:  # noqa: BLE001
        return False
    finally:
        channel.close()


async def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll an async predicate until true, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def gateway_ready(stack) -> bool:
    """The gateway's /readyz: every zone's upstreams answered their last health check."""
    try:
        with urllib.request.urlopen(stack.http_url + "/readyz", timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def pid_gone(pid: int) -> bool:
    """Whether the process has exited (a zombie of another parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


class Replacements:
    """Edge workers this module started in place of the stack's own; stopped when the module ends."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.children: list[Child] = []

    async def restart(self, edge: EdgeProcess) -> EdgeProcess:
        """SIGTERM the worker, wait for its drain and exit, start the same command again until SERVING."""
        os.kill(edge.pid, signal.SIGTERM)
        await wait_until(lambda: _async(pid_gone(edge.pid)), 30, f"{edge.zone} edge to drain and exit")
        return await self.start(edge)

    async def start(self, edge: EdgeProcess) -> EdgeProcess:
        """Start a process worker with `edge`'s command line and wait until it is SERVING."""
        log = self.stack.var_dir / "logs" / f"{edge.zone}-edge.replacement.log"
        child = Child(f"{edge.zone}-edge", edge.argv, log, cwd=ROOT)
        child.start()
        self.children.append(child)
        await wait_until(lambda: serving(edge.host, edge.port), 120, f"{edge.zone} edge to serve again")
        return EdgeProcess(edge.zone, edge.host, edge.port, child.pid or 0, edge.argv)

    def stop_all(self) -> None:
        """Stop every replacement (the stack's own `meridian down` knows nothing of them)."""
        for child in self.children:
            child.stop()


async def _async(value: bool) -> bool:
    return value


# Session scope: the replacements keep serving for the test folders that run after this one, and
# stop just before the shared stack does.
@pytest.fixture(scope="session")
def replacements(stack):
    spares = Replacements(stack)
    yield spares
    spares.stop_all()


async def test_edge_small_streams_from_the_edge_and_matches_pytorch(stack, small_lm_dir: Path, torch_lm) -> None:
    prompt = "The edge answers"
    expected = torch_greedy(torch_lm, SmallLM.load(small_lm_dir).encode(prompt), 24)
    lm = SmallLM.load(small_lm_dir)
    expected_text = lm.tokenizer.decode(expected, skip_special_tokens=True)
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as client:
        r = await client.post("/v1/completions", json={"model": LM, "prompt": prompt, "max_tokens": 24,
                                                       "temperature": 0, "stream": True}, headers=NO_STORE)
        whole = await client.post("/v1/completions", json={"model": LM, "prompt": prompt, "max_tokens": 24,
                                                           "temperature": 0}, headers=NO_STORE)
    assert r.status == 200, r.body
    assert r.headers["x-meridian-tier"] == "edge"
    events = r.sse_events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len([c for c in chunks if c["choices"][0]["text"]]) > 1, "tokens should arrive as a stream"
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text
    assert whole.headers["x-meridian-tier"] == "edge"
    body = whole.json()
    assert body["choices"][0]["text"] == expected_text
    assert body["usage"]["completion_tokens"] == len(expected)


async def test_edge_small_chat_completes_the_conversation_and_matches_pytorch(stack, small_lm_dir: Path, torch_lm) -> None:
    # The messages reach the edge (they were once dropped, and edge-small completed an empty prompt).
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does water boil?"}]
    lm = SmallLM.load(small_lm_dir)
    prompt_ids = lm.encode(lm.chat_prompt(messages))
    expected = torch_greedy(torch_lm, prompt_ids, 16)
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as client:
        r = await client.post("/v1/chat/completions", json={"model": LM, "messages": messages, "max_tokens": 16,
                                                            "temperature": 0}, headers=NO_STORE)
    assert r.status == 200, r.body
    assert r.headers["x-meridian-tier"] == "edge"
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["choices"][0]["message"]["content"] == lm.tokenizer.decode(expected, skip_special_tokens=True)


async def _embed_load(stack, stop: asyncio.Event, clients: int) -> tuple[int, list[str]]:
    """Steady embedding load through the gateway until `stop`: (successes, failures)."""
    ok, failures = 0, []

    async def one_client(index: int) -> None:
        nonlocal ok
        async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as client:
            n = 0
            while not stop.is_set():
                n += 1
                r = await client.post("/v1/embeddings", json={"model": EMBED, "input": f"load {index} {n}"},
                                      headers=NO_STORE)
                if r.status == 200 and len(r.json()["data"][0]["embedding"]) == 384:
                    ok += 1
                else:
                    failures.append(f"{r.status} {r.body[:200]!r}")
                await asyncio.sleep(0.02)

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return ok, failures


async def test_rolling_restart_of_both_edges_under_load_fails_no_request(stack, replacements) -> None:
    edges = [find_edge(stack, zone) for zone in stack.topology["zones"]]
    stop = asyncio.Event()
    load = asyncio.create_task(_embed_load(stack, stop, clients=4))
    await asyncio.sleep(2)  # steady state first
    for edge in edges:
        new = await replacements.restart(edge)
        assert new.pid != edge.pid
        # As an operator's rollout does: the next worker goes only once the gateway sees this one ready.
        await wait_until(lambda: _async(gateway_ready(stack)), 60, "the gateway to see every zone ready")
    stop.set()
    ok, failures = await load
    assert failures == [], failures[:5]
    assert ok > 50, f"only {ok} requests ran during the restart"


async def _zone_b_embeddings(stack, texts: list[str]) -> tuple[np.ndarray, str]:
    """Embeddings through the gateway from a client in zone-b's region: (vectors, zone that answered).
    Asked again, for up to 15 s, while another zone answers: a zone-b edge that has just (re)started
    ranks behind zone-a until its probes' round-trip peak decays, and a cold first inference (over
    the 250 ms hedge delay on a loaded machine) lets the hedge to zone-a win; neither is this test's
    subject."""
    deadline = time.monotonic() + 15
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as client:
        while True:
            r = await client.post("/v1/embeddings", json={"model": EMBED, "input": texts},
                                  headers={**NO_STORE, "x-meridian-region": "eu-central"})
            assert r.status == 200, r.body
            if r.headers["x-meridian-zone"] == stack.topology["zones"][1]["name"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32), r.headers["x-meridian-zone"]


async def test_container_edge_answers_like_the_process_edge(stack, replacements, tmp_path: Path) -> None:
    reason = image_unavailable(IMAGE, "edge-image")
    if reason:
        pytest.skip(reason)
    texts = ["The container answers too.", "東京タワー", "short", "The quick brown fox jumps over the lazy dog."]
    zone_b = stack.topology["zones"][1]
    process_vectors, zone = await _zone_b_embeddings(stack, texts)
    assert zone == zone_b["name"]
    edge = find_edge(stack, zone_b)
    os.kill(edge.pid, signal.SIGTERM)
    await wait_until(lambda: _async(pid_gone(edge.pid)), 30, "zone-b's process edge to exit")
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(stack.topology))  # model paths stay relative: /models in the image
    topology.chmod(0o644)
    name = f"meridian-edge-test-{os.getpid()}"
    started = podman("run", "-d", "--rm", "--init", "--network=host", "--name", name,
                     "-e", f"MERIDIAN_ZONE={zone_b['name']}", "-v", f"{topology}:/etc/meridian/topology.yaml:ro", IMAGE)
    assert started.returncode == 0, started.stderr
    try:
        await wait_until(lambda: serving(zone_b["address"], zone_b["edge"]["port"]), 120, "the container to serve")
        health = podman("healthcheck", "run", name)
        assert health.returncode == 0, health.stdout + health.stderr
        await asyncio.sleep(2)  # the gateway's probes mark zone-b healthy again
        container_vectors, zone = await _zone_b_embeddings(stack, texts)
        assert zone == zone_b["name"]
        np.testing.assert_allclose(container_vectors, process_vectors, atol=1e-5)
        user = podman("exec", name, "id", "-u")
        assert user.stdout.strip() != "0", "the edge must not run as root"
    finally:
        stopped = podman("stop", "-t", "30", name, timeout=60)
        await replacements.start(edge)  # zone-b gets its process edge back for the tests after this one
    assert stopped.returncode == 0, stopped.stderr
