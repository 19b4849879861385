"""What the gateway costs, side by side with its references, in one run.

1. A cache hit over HTTP/3 and HTTP/1.1 against a bare Redis GET from Python.
2. The gateway's added latency and its throughput against calling the edge worker directly.
3. The gateway's own CPU time per request (process CPU seconds over requests) for a cache hit and a
   forwarded request, against Caddy answering itself and reverse-proxying over HTTP/3.
4. The hit rate on a Zipf(1.1) stream of 10,000 requests over 1,000 distinct prompts.

    .venv/bin/python bench/gateway.py [--requests 2000] [--no-record]

It starts its own Redis, one edge worker and one gateway on private ports, and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.launcher import LocalStack, free_port, resolve_topology  # noqa: E402
from deploy.settings import DEFAULT_TOPOLOGY, Settings  # noqa: E402
from tests.support.h3 import h3_client  # noqa: E402

MODEL = "all-minilm-l6-v2"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the stack under test -----------------------------------------------------------------------


def start_stack(var: Path) -> tuple[LocalStack, dict]:
    """Redis, one edge-only zone and the gateway, on private ports."""
    raw = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    raw["gateway"]["http1"]["port"] = free_port()
    raw["gateway"]["http3"]["port"] = free_port(socket.SOCK_DGRAM)
    raw["gateway"]["https"] = {"host": "127.0.0.1", "port": 0}
    raw["redis"]["port"] = free_port()
    zone = raw["zones"][0]
    zone.update({"address": "127.0.61.1", "core": None})
    raw["zones"] = [zone]
    raw["models"] = [m for m in raw["models"] if m["name"] == MODEL]
    path = var / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = Settings.resolve(topology=str(path), var_dir=str(var))
    stack = LocalStack(settings, resolve_topology(settings))
    stack.start(progress=log)
    return stack, raw


# -- 1. cache hits ------------------------------------------------------------------------------


async def redis_get_latency(port: int, n: int) -> list[float]:
    import redis.asyncio as aioredis

    r = aioredis.Redis(port=port)
    await r.set("bench:key", b"x" * 1600)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await r.get("bench:key")
        out.append(time.perf_counter() - t)
    await r.aclose()
    return out


async def h3_latency(port: int, key: str, body: dict, n: int, headers: dict | None = None) -> list[float]:
    out = []
    async with h3_client("127.0.0.1", port, key) as c:
        await c.post("/v1/embeddings", json=body, headers=headers)
        for _ in range(n):
            t = time.perf_counter()
            r = await c.post("/v1/embeddings", json=body, headers=headers)
            out.append(time.perf_counter() - t)
            assert r.status == 200, r.body
    return out


async def h1_latency(url: str, key: str, body: dict, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {key}"}) as s:
        async with s.post(url + "/v1/embeddings", json=body) as r:
            await r.read()
        for _ in range(n):
            t = time.perf_counter()
            async with s.post(url + "/v1/embeddings", json=body) as r:
                await r.read()
            out.append(time.perf_counter() - t)
    return out


# -- 2. added latency and throughput ------------------------------------------------------------


async def direct_edge(host: str, port: int, n: int, concurrency: int) -> tuple[list[float], float]:
    from grpclib.client import Channel

    from edge.api import edge_pb2
    from edge.api.edge_grpc import EdgeStub

    channel = Channel(host, port)
    stub = EdgeStub(channel)
    lat: list[float] = []

    async def one(i: int) -> None:
        t = time.perf_counter()
        await stub.Embed(edge_pb2.EmbedRequest(model=MODEL, inputs=[f"direct {i} {random.random()}"]))
        lat.append(time.perf_counter() - t)

    rate = await run_concurrent(one, n, concurrency)
    channel.close()
    return lat, rate


async def via_gateway_h1(url: str, key: str, n: int, concurrency: int) -> tuple[list[float], float]:
    lat: list[float] = []
    headers = {"authorization": f"Bearer {key}", "cache-control": "no-cache"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def one(i: int) -> None:
            t = time.perf_counter()
            async with s.post(url + "/v1/embeddings", json={"model": MODEL, "input": [f"via {i} {random.random()}"]}) as r:
                await r.read()
                assert r.status == 200
            lat.append(time.perf_counter() - t)

        rate = await run_concurrent(one, n, concurrency)
    return lat, rate


async def run_concurrent(one, n: int, concurrency: int) -> float:
    """Requests per second of `n` calls with `concurrency` in flight."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t)


# -- 3. CPU per request -------------------------------------------------------------------------


async def h3_load(port: int, key: str | None, path: str, body: dict | None, n: int, concurrency: int,
                  headers: dict | None = None, unique: bool = False) -> None:
    """`n` requests over one HTTP/3 connection with `concurrency` streams in flight."""
    async with h3_client("127.0.0.1", port, key) as c:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                b = dict(body or {})
                if unique:
                    b["input"] = [f"cpu {i} {random.random()}"]
                if body is None:
                    r = await c.get(path, headers=headers)
                else:
                    r = await c.post(path, json=b, headers=headers)
                assert r.status == 200, (r.status, r.body[:200])

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def cpu_per_request(pid: int, load, n: int) -> float:
    before = cpu_seconds(pid)
    await load
    return (cpu_seconds(pid) - before) / n


def start_caddy(var: Path, cert: str, key: str, upstream_port: int, answer: str) -> tuple[subprocess.Popen, int] | None:
    """Caddy on HTTP/3 (and TLS TCP): /hit answers `answer` itself, /v1/* is proxied to the gateway's HTTP/1.1."""
    if not shutil.which("caddy"):
        return None
    port = free_port()
    caddyfile = var / "Caddyfile"
    caddyfile.write_text(f"""{{
    admin off
    auto_https off
    default_sni 127.0.0.1
    servers {{
        protocols h1 h2 h3
    }}
    log {{
        output discard
    }}
}}
https://127.0.0.1:{port} {{
    tls {cert} {key}
    respond /hit `{answer}` 200
    reverse_proxy /v1/* 127.0.0.1:{upstream_port}
}}
""")
    proc = subprocess.Popen(["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                            stdout=subprocess.DEVNULL, stderr=open(var / "caddy.log", "wb"),
                            env={**os.environ, "HOME": str(var), "XDG_DATA_HOME": str(var), "XDG_CONFIG_HOME": str(var)})
    time.sleep(1.5)
    return (proc, port) if proc.poll() is None else None


# -- 4. Zipf hit rate ---------------------------------------------------------------------------


async def zipf_hit_rate(url: str, key: str, n: int, distinct: int, s: float, concurrency: int) -> float:
    rng = random.Random(11)
    weights = [1 / (k ** s) for k in range(1, distinct + 1)]
    ranks = rng.choices(range(distinct), weights=weights, k=n)
    nonce = random.random()
    hits = 0
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(i: int) -> None:
            nonlocal hits
            body = {"model": MODEL, "input": [f"zipf prompt {ranks[i]} {nonce}"]}
            async with session.post(url + "/v1/embeddings", json=body) as r:
                await r.read()
                hits += r.headers.get("x-meridian-cache") == "hit"

        await run_concurrent(one, n, concurrency)
    return hits / n


# -- the run ------------------------------------------------------------------------------------


async def measure(stack: LocalStack, raw: dict, n: int) -> dict:
    g = raw["gateway"]
    url = f"http://127.0.0.1:{g['http1']['port']}"
    h3 = g["http3"]["port"]
    key = stack.settings.api_key
    gw_pid = stack.child("gateway").pid
    zone = raw["zones"][0]
    # base64 is what the official openai client asks for by default.
    hit_body = {"model": MODEL, "input": ["the cached sentence"], "encoding_format": "base64"}
    res: dict = {}

    log("1/4 cache hit latency")
    res["redis_get"] = await redis_get_latency(raw["redis"]["port"], n)
    res["hit_h3"] = await h3_latency(h3, key, hit_body, n)
    res["hit_h1"] = await h1_latency(url, key, hit_body, n)

    log("2/4 added latency and throughput (cache bypassed)")
    m = max(200, n // 4)
    res["edge_direct_c1"], _ = await direct_edge(zone["address"], zone["edge"]["port"], m, 1)
    res["gw_h1_c1"], _ = await via_gateway_h1(url, key, m, 1)
    _, res["edge_direct_rps"] = await direct_edge(zone["address"], zone["edge"]["port"], m, 16)
    _, res["gw_h1_rps"] = await via_gateway_h1(url, key, m, 16)

    log("3/4 CPU per request")
    res["cpu_healthz"] = await cpu_per_request(gw_pid, h3_load(h3, None, "/healthz", None, n, 8), n)
    res["cpu_hit"] = await cpu_per_request(gw_pid, h3_load(h3, key, "/v1/embeddings", hit_body, n, 8), n)
    res["cpu_forward"] = await cpu_per_request(
        gw_pid, h3_load(h3, key, "/v1/embeddings", hit_body, m, 8, headers={"cache-control": "no-cache"}, unique=True), m
    )
    # Caddy answers the very bytes the gateway answers a hit with, so both move the same data.
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {key}"}) as s:
        async with s.post(url + "/v1/embeddings", json=hit_body) as r:
            answer = await r.text()
    caddy = start_caddy(stack.settings.var_dir, stack.topology.gateway.tls.cert, stack.topology.gateway.tls.key,
                        g["http1"]["port"], answer)
    if caddy is not None:
        proc, port = caddy
        try:
            res["caddy_self"] = await cpu_per_request(proc.pid, h3_load(port, None, "/hit", None, n, 8), n)
            # Caddy proxying the same (cached) request to the gateway's HTTP/1.1: Caddy's share only.
            res["caddy_proxy"] = await cpu_per_request(
                proc.pid, h3_load(port, key, "/v1/embeddings", hit_body, n, 8), n
            )
        finally:
            proc.terminate()
            proc.wait(10)

    log("4/4 Zipf(1.1) hit rate, 10,000 requests over 1,000 prompts")
    res["zipf_hit_rate"] = await zipf_hit_rate(url, key, 10_000, 1_000, 1.1, 16)
    return res


def table(res: dict) -> str:
    ms = lambda v: f"{v * 1000:.2f}"  # noqa: E731
    us = lambda v: f"{v * 1e6:.0f}"  # noqa: E731
    rows = [
        "| measure | p50 ms | p99 ms |",
        "| --- | --- | --- |",
        f"| bare Redis GET (redis-py asyncio) | {ms(pct(res['redis_get'], 50))} | {ms(pct(res['redis_get'], 99))} |",
        f"| cache hit, HTTP/3 | {ms(pct(res['hit_h3'], 50))} | {ms(pct(res['hit_h3'], 99))} |",
        f"| cache hit, HTTP/1.1 | {ms(pct(res['hit_h1'], 50))} | {ms(pct(res['hit_h1'], 99))} |",
        f"| embed, edge directly (gRPC) | {ms(pct(res['edge_direct_c1'], 50))} | {ms(pct(res['edge_direct_c1'], 99))} |",
        f"| embed, through the gateway (HTTP/1.1, cache bypassed) | {ms(pct(res['gw_h1_c1'], 50))} | {ms(pct(res['gw_h1_c1'], 99))} |",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| gateway added latency, p50 | {ms(pct(res['gw_h1_c1'], 50) - pct(res['edge_direct_c1'], 50))} ms |",
        f"| throughput at concurrency 16: edge directly / through the gateway | {res['edge_direct_rps']:.0f} / {res['gw_h1_rps']:.0f} req/s ({res['gw_h1_rps'] / res['edge_direct_rps']:.2f}x) |",
        f"| gateway CPU per request, /healthz (HTTP/3: the listener's floor) | {us(res['cpu_healthz'])} us |",
        f"| gateway CPU per cache hit (HTTP/3) | {us(res['cpu_hit'])} us |",
        f"| gateway CPU per forwarded request (HTTP/3, gateway side only) | {us(res['cpu_forward'])} us |",
    ]
    if "caddy_self" in res:
        rows += [
            f"| Caddy CPU per request answering the same bytes itself (HTTP/3) | {us(res['caddy_self'])} us |",
            f"| Caddy CPU per request reverse-proxying to an HTTP/1.1 upstream (HTTP/3) | {us(res['caddy_proxy'])} us |",
            f"| ratio gateway hit / Caddy self; gateway forward / Caddy proxy | {res['cpu_hit'] / res['caddy_self']:.2f}x; {res['cpu_forward'] / res['caddy_proxy']:.2f}x |",
        ]
    rows.append(f"| Zipf(1.1) hit rate, 10,000 requests over 1,000 prompts | {res['zipf_hit_rate'] * 100:.1f}% |")
    return "\n".join(rows)


def record(text: str, n: int) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
    section = (f"\n## Gateway (`bench/gateway.py`)\n\n`.venv/bin/python bench/gateway.py --requests {n}` on {machine}, "
               f"{time.strftime('%Y-%m-%d')}. Shared 2-core machine: compare ratios, not absolute times.\n\n{text}\n")
    doc.write_text(doc.read_text() + section if doc.exists() else "# Benchmarks\n" + section)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--no-record", action="store_true", help="print only; do not append to docs/BENCHMARKS.md")
    args = p.parse_args()
    var = Path(tempfile.mkdtemp(prefix="meridian-bench-"))
    log(f"starting Redis, an edge worker and the gateway under {var}")
    stack, raw = start_stack(var)
    try:
        res = asyncio.run(measure(stack, raw, args.requests))
    finally:
        stack.stop()
    text = table(res)
    print(text)
    if not args.no_record:
        record(text, args.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
