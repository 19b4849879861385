"""Two gateway processes sharing one Redis enforce one tenant limit together."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.integration

RPS, BURST = 20, 20


@pytest.fixture(scope="module")
def two_gateways(stack, tmp_path_factory):
    base = yaml.safe_load((stack.var_dir / "run" / "topology.yaml").read_text())
    base["limits"] = {"tenants": {"local": {"requests_per_second": RPS, "burst": BURST}}}
    procs, urls = [], []
    for i in range(2):
        topo = dict(base, gateway=dict(base["gateway"]))
        port = free_port()
        topo["gateway"]["http1"] = {"host": "127.0.0.1", "port": port}
        topo["gateway"]["http3"] = {"host": "127.0.0.1", "port": free_port(socket.SOCK_DGRAM)}
        topo["gateway"]["https"] = {"host": "127.0.0.1", "port": 0}
        path = tmp_path_factory.mktemp(f"gw{i}") / "topology.yaml"
        path.write_text(yaml.safe_dump(topo))
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "--topology", str(path)]))
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    for url in urls:
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.1)
    yield urls
    for p in procs:
        p.terminate()
        p.wait(10)


async def hammer(urls: list[str], key: str, seconds: float) -> tuple[int, int, float]:
    ok = refused = 0
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        started = time.monotonic()

        async def worker(url: str) -> None:
            nonlocal ok, refused
            while time.monotonic() - started < seconds:
                async with session.get(url + "/v1/models") as r:
                    await r.read()
                    if r.status == 200:
                        ok += 1
                    elif r.status == 429:
                        refused += 1
                        assert int(r.headers["retry-after"]) >= 1
                await asyncio.sleep(0.005)

        await asyncio.gather(*(worker(u) for u in urls for _ in range(2)))
        return ok, refused, time.monotonic() - started


async def test_one_limit_across_two_gateway_processes(stack, two_gateways):
    ok, refused, elapsed = await hammer(two_gateways, stack.api_key, 3.0)
    expected = BURST + RPS * elapsed
    assert refused > 0
    assert abs(ok - expected) <= 0.1 * expected, (ok, expected)
