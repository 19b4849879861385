"""A zone whose edge is several workers behind one name (a Kubernetes headless Service): the
gateway's edge client balances over real workers, passes over one that is gone or draining, and
follows the name through a rolling restart without failing a request.

The name's answers come from a resolver the test controls (the workers listen on loopback ports);
everything else is real: worker processes' servers, gRPC, drain."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from deploy.drills.faults import Fault
from deploy.drills.proxy import FaultState, Forward, start_forwards
from edge.config import EdgeConfig
from edge.export import build_embedding_model
from edge.lm_export import build_small_lm
from edge.server import EdgeServer
from gateway.config import RoutingConfig
from gateway.edge_client import EdgeUpstream
from gateway.failover import Failover
from gateway.metrics import Metrics
from gateway.upstreams import GenerateCall, UpstreamPool

EMBED, LM = "all-minilm-l6-v2", "edge-small"


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> dict[str, Path]:
    return {EMBED: build_embedding_model(cache_dir / "edge" / EMBED), LM: build_small_lm(cache_dir / "edge" / LM)}


async def start_worker(models: dict[str, Path], zone: str = "zone-a") -> EdgeServer:
    # No grace: a stopping worker refuses new requests at once, the hardest case for the client.
    server = EdgeServer(EdgeConfig(host="127.0.0.1", port=0, zone=zone, models=models,
                                   drain_grace_s=0.0, drain_timeout_s=10.0))
    await server.start()
    return server


class Name:
    """What the zone's name resolves to, as the test says."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)

    async def __call__(self, host: str, port: int) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.ports]


def zone_edge(name: Name) -> EdgeUpstream:
    return EdgeUpstream("zone-a", "edge-zone-a", 50051, max_in_flight=2, resolver=name)


def served(upstream: EdgeUpstream) -> dict[int, int]:
    """Embed RPCs per worker port."""
    return {r.address[1]: r.conn.coalescer.rpcs for r in upstream.replicas.replicas}


async def stream_text(upstream: EdgeUpstream, prompt: str) -> str:
    call = GenerateCall(model=LM, prompt=prompt, max_tokens=8, temperature=0.0)
    chunks = [c async for c in upstream.generate(call, timeout=30)]
    assert chunks[-1].finish_reason in ("stop", "length")
    return "".join(c.text for c in chunks)


@pytest.fixture(scope="module")
async def pair(models) -> AsyncIterator[tuple[EdgeServer, EdgeServer]]:
    a, b = await start_worker(models), await start_worker(models)
    yield a, b
    await asyncio.gather(a.stop(), b.stop())


async def test_requests_spread_over_the_zone_s_workers_with_the_same_answers(pair):
    a, b = pair
    texts = [f"sentence {i} about {'rivers' if i % 3 else 'mountains'}" for i in range(48)]
    alone = EdgeUpstream("zone-a", "127.0.0.1", a.port)
    upstream = zone_edge(Name(a.port, b.port))
    try:
        expected = [await alone.embed(EMBED, [t], timeout=30) for t in texts[:8]]
        got = []
        for i in range(0, len(texts), 8):
            got += await asyncio.gather(*(upstream.embed(EMBED, [t], timeout=30) for t in texts[i:i + 8]))
        counts = served(upstream)
    finally:
        await asyncio.gather(alone.close(), upstream.close())
    assert set(counts) == {a.port, b.port}
    assert min(counts.values()) >= 0.2 * sum(counts.values()), counts
    for mine, reference in zip(got, expected):
        np.testing.assert_allclose(mine.vectors, reference.vectors, atol=1e-5)
        assert mine.prompt_tokens == reference.prompt_tokens


async def test_a_stream_closed_early_frees_its_worker_at_once(pair):
    a, b = pair
    upstream = zone_edge(Name(a.port, b.port))
    try:
        stream = upstream.generate(GenerateCall(model=LM, prompt="A long story", max_tokens=200), timeout=30)
        await anext(stream)
        assert sum(r.outstanding for r in upstream.replicas.replicas) == 1
        await stream.aclose()
        assert sum(r.outstanding for r in upstream.replicas.replicas) == 0
    finally:
        await upstream.close()


async def test_a_worker_that_is_gone_or_draining_is_passed_over_inside_the_zone(pair, models):
    _, b = pair
    draining = await start_worker(models)
    draining.service.begin_drain()  # refuses every request with UNAVAILABLE, health NOT_SERVING
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    gone_port = gone.getsockname()[1]
    gone.close()  # connection refused from now on
    upstream = zone_edge(Name(gone_port, draining.port, b.port))
    try:
        embeds = asyncio.gather(*(upstream.embed(EMBED, [f"text {i}"], timeout=30) for i in range(12)))
        streams = asyncio.gather(*(stream_text(upstream, f"Prompt {i}") for i in range(4)))
        vectors, texts = await asyncio.wait_for(asyncio.gather(embeds, streams), 60)
        reference = zone_edge(Name(b.port))
        try:
            assert texts == [await stream_text(reference, f"Prompt {i}") for i in range(4)]
        finally:
            await reference.close()
        by_port = {r.address[1]: r for r in upstream.replicas.replicas}
        assert all(v.vectors.shape == (1, 384) for v in vectors)
        assert not by_port[gone_port].serving and not by_port[draining.port].serving
        assert await upstream.health(timeout=1.0)  # b serves
        assert [p for p, r in by_port.items() if r.serving] == [b.port]
        # Counted for /metrics: each request turned away went on to another replica (at least the
        # first to find each of the two lost), none of them more than twice.
        assert 2 <= upstream.replica_moves <= 2 * 16
    finally:
        await upstream.close()
        await draining.stop()


class SilentWorker:
    """A worker that accepts connections and never answers (a hung process, a partitioned pod)."""

    def __init__(self) -> None:
        self.held: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> int:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.held.append(writer)

        self.server = await asyncio.start_server(hang, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for writer in self.held:
            writer.close()


async def embed_text(upstream: EdgeUpstream, text: str) -> list[float]:
    """One embedding, to 5 decimals (the same worker's answers to the same text agree to those)."""
    return np.round((await upstream.embed(EMBED, [text], timeout=30)).vectors[0], 5).tolist()


@pytest.mark.parametrize("ask", [stream_text, embed_text], ids=["stream", "embedding"])
async def test_a_request_waiting_on_a_silent_worker_moves_to_the_zone_s_other_worker(pair, ask):
    # The zone stays healthy on its other worker, so only the silent one's own probe can end the
    # wait (for a stream's first chunk, or an embedding), long before the 30 s / 10 s timeouts.
    _, b = pair
    async with SilentWorker() as silent_port:
        upstream = zone_edge(Name(silent_port, b.port))
        pool = UpstreamPool([upstream], RoutingConfig())
        try:
            await upstream.replicas.ready()
            live = next(r for r in upstream.replicas.replicas if r.address[1] == b.port)
            live.outstanding += 1  # looks busier: the request is sent to the silent worker
            pool.start()
            started = time.monotonic()
            got = await asyncio.wait_for(ask(upstream, "Prompt 0"), 10)
            waited = time.monotonic() - started
            live.outstanding -= 1
            reference = zone_edge(Name(b.port))
            try:
                assert got == await ask(reference, "Prompt 0")
            finally:
                await reference.close()
            assert waited < 2.5, waited  # one probe timeout (1 s while unmeasured) and change
            assert pool.endpoints[0].available()
            by_port = {r.address[1]: r for r in upstream.replicas.replicas}
            assert not by_port[silent_port].answering and by_port[b.port].answering
        finally:
            await pool.close()


async def test_a_hedged_embedding_goes_to_the_zone_s_other_worker_not_back_to_the_silent_one(pair):
    # Two workers, the silent one made to look idle: the request goes to it, and its hedge must go
    # to the live worker (the less loaded pick would send it back to the silent one), in the zone.
    _, b = pair
    async with SilentWorker() as silent_port:
        upstream = zone_edge(Name(silent_port, b.port))
        config = RoutingConfig(hedge_after_s=0.1)
        pool = UpstreamPool([upstream], config)
        failover = Failover(config, Metrics())
        try:
            await pool.check_once()
            by_port = {r.address[1]: r for r in upstream.replicas.replicas}
            by_port[silent_port].serving = True  # not yet found out: its probe is still waiting
            by_port[b.port].outstanding += 5  # so that the less loaded pick is the silent one
            started = time.monotonic()
            endpoint, got, tries = await failover.unary(
                pool.for_tier("edge"), lambda e: e.upstream.embed(EMBED, ["hedged"], timeout=30), hedge=True
            )
            assert time.monotonic() - started < 0.6
            assert tries == 2 and failover.metrics.retries.get("hedge_in_zone") == 1
            assert got.vectors.shape == (1, 384)
            assert endpoint.outlier.consecutive_failures == 0
            by_port[b.port].outstanding -= 5
        finally:
            await pool.close()


async def start_stream_on_the_other(pool: UpstreamPool, failover: Failover, call: GenerateCall, live_port: int):
    """A resumable stream opened on the zone's replica that is not at `live_port` (the live one
    made to look busier for the pick)."""
    await pool.check_once()
    pool.start()
    upstream = pool.endpoints[0].upstream
    live = next(r for r in upstream.replicas.replicas if r.address[1] == live_port)
    live.outstanding += 1
    stream = failover.stream(pool.for_tier("edge"), call)
    await stream.start()
    live.outstanding -= 1
    return stream


async def assert_resumed_in_the_zone(stream, got: list, call: GenerateCall, live_port: int, failover: Failover,
                                     pool: UpstreamPool) -> None:
    """Resumed once, token for token as an undisturbed run on the live worker, the zone uncharged."""
    reference = [c async for c in zone_edge(Name(live_port)).generate(call, timeout=30)]
    assert stream.resumed == 1 and got[-1].finish_reason in ("stop", "length")
    assert [t for c in got for t in c.token_ids] == [t for c in reference for t in c.token_ids]
    endpoint = pool.endpoints[0]
    assert endpoint.available() and endpoint.outlier.consecutive_failures == 0
    assert failover.metrics.ejections.get("zone-a", "edge") == 0
    assert failover.metrics.upstream_errors.get("zone-a", "edge") == 0


@pytest.mark.parametrize("fault", [Fault(reset=True), Fault(blackhole=True)], ids=["killed", "silent"])
async def test_a_stream_whose_worker_dies_mid_stream_goes_on_from_the_zone_s_other_worker(pair, fault):
    # After the first chunks the worker's connection is reset (a pod killed, not drained) or goes
    # silent (a hung pod: seen by its probe, well before the 2 s chunk-gap timeout): the stream
    # resumes on the zone's other worker, token for token, and the zone is not ejected.
    a, b = pair
    state = FaultState()
    (proxy,) = await start_forwards(state, [Forward("tcp", ("127.0.0.1", 0), ("127.0.0.1", a.port))])
    proxy_port = proxy.sockets[0].getsockname()[1]
    upstream = zone_edge(Name(proxy_port, b.port))
    config = RoutingConfig()
    pool = UpstreamPool([upstream], config)
    failover = Failover(config, Metrics())
    call = GenerateCall(model=LM, prompt="Once upon a time", max_tokens=48, temperature=0.8, seed=7)
    try:
        stream = await start_stream_on_the_other(pool, failover, call, b.port)  # behind the proxy
        chunks = stream.chunks()
        got = [await anext(chunks) for _ in range(3)]
        state.set(fault)
        started = time.monotonic()
        got += [c async for c in chunks]
        await stream.aclose()
        assert time.monotonic() - started < 1.8  # not the chunk-gap timeout
        await assert_resumed_in_the_zone(stream, got, call, b.port, failover, pool)
    finally:
        state.set(Fault())
        await pool.close()
        proxy.close()


async def test_a_stream_that_stalls_on_one_worker_goes_on_from_the_zone_s_other_worker(pair, monkeypatch):
    # A worker that still answers its health checks but sends nothing for the chunk gap (a wedged
    # generation): the stream resumes in the zone, on the other worker, token for token, and the
    # zone is not charged with the stall.
    a, b = pair
    lm = a.service.models[LM]
    real = lm.stream

    def stalls_after_three_chunks(prompt, params):
        for i, chunk in enumerate(real(prompt, params)):
            if i == 3:
                time.sleep(1.5)  # in the worker's inference thread: its RPC goes quiet
            yield chunk

    monkeypatch.setattr(lm, "stream", stalls_after_three_chunks)
    upstream = zone_edge(Name(a.port, b.port))
    config = RoutingConfig(chunk_gap_timeout_s=0.5)
    pool = UpstreamPool([upstream], config)
    failover = Failover(config, Metrics())
    call = GenerateCall(model=LM, prompt="Once upon a time", max_tokens=48, temperature=0.8, seed=11)
    try:
        stream = await start_stream_on_the_other(pool, failover, call, b.port)  # on the stalling worker
        got = [c async for c in stream.chunks()]
        await stream.aclose()
        await assert_resumed_in_the_zone(stream, got, call, b.port, failover, pool)
    finally:
        await pool.close()


async def test_a_worker_whose_streams_stall_is_ejected_and_the_zone_s_next_streams_go_to_the_other(pair, monkeypatch):
    # A wedged worker answers its probes but every stream it starts goes quiet. After two stalls
    # in a row (each resumed on the other worker), it takes no new streams while ejected: the
    # next ones, though it looks the less loaded, start and finish on the other worker, unresumed.
    a, b = pair
    lm = a.service.models[LM]
    real = lm.stream
    stalled = []

    def always_stalls(prompt, params):
        for i, chunk in enumerate(real(prompt, params)):
            if i == 2:
                stalled.append(i)
                time.sleep(1.0)
            yield chunk

    monkeypatch.setattr(lm, "stream", always_stalls)
    upstream = zone_edge(Name(a.port, b.port))
    config = RoutingConfig(chunk_gap_timeout_s=0.5, base_ejection_s=30.0)
    pool = UpstreamPool([upstream], config)
    failover = Failover(config, Metrics())
    try:
        for i in range(2):
            call = GenerateCall(model=LM, prompt=f"Stall {i}", max_tokens=24, temperature=0.0)
            stream = await start_stream_on_the_other(pool, failover, call, b.port)
            got = [c async for c in stream.chunks()]
            await stream.aclose()
            assert stream.resumed == 1 and got[-1].finish_reason in ("stop", "length")
        assert upstream.replica_ejections == 1 and upstream.serving_replicas == 1
        by_port = {r.address[1]: r for r in upstream.replicas.replicas}
        for i in range(4):
            by_port[b.port].outstanding += 1  # the other looks busier, yet takes the stream
            call = GenerateCall(model=LM, prompt=f"Steady {i}", max_tokens=24, temperature=0.0)
            stream = failover.stream(pool.for_tier("edge"), call)
            await stream.start()
            by_port[b.port].outstanding -= 1
            got = [c async for c in stream.chunks()]
            await stream.aclose()
            assert stream.resumed == 0 and got[-1].finish_reason in ("stop", "length")
        assert len(stalled) == 2  # the wedged worker was given no third stream
        assert pool.endpoints[0].available() and failover.metrics.upstream_errors.get("zone-a", "edge") == 0
    finally:
        await pool.close()


async def test_a_worker_that_keeps_losing_in_zone_hedges_is_ejected_and_embeddings_stop_waiting_on_it(pair, monkeypatch):
    # Embeddings on a worker slow by a second each: every one is answered by its in-zone hedge.
    # After two such losses the worker is ejected, and the next embeddings go straight to the
    # other worker: one try each, no hedge wait.
    a, b = pair
    real = a.service.embedder.embed

    async def slow(name, model, texts):
        await asyncio.sleep(1.0)
        return await real(name, model, texts)

    monkeypatch.setattr(a.service.embedder, "embed", slow)
    upstream = zone_edge(Name(a.port, b.port))
    config = RoutingConfig(hedge_after_s=0.1, base_ejection_s=30.0, retry_budget_min_per_s=100.0)
    pool = UpstreamPool([upstream], config)
    failover = Failover(config, Metrics())
    try:
        await pool.check_once()
        by_port = {r.address[1]: r for r in upstream.replicas.replicas}

        async def embed(text: str) -> tuple[int, float]:
            started = time.monotonic()
            _, got, tries = await failover.unary(
                pool.for_tier("edge"), lambda e: e.upstream.embed(EMBED, [text], timeout=30), hedge=True
            )
            assert got.vectors.shape == (1, 384)
            return tries, time.monotonic() - started

        by_port[b.port].outstanding += 5  # the first tries go to the slow worker
        hedged = [await embed(f"hedged {i}") for i in range(2)]
        assert [tries for tries, _ in hedged] == [2, 2]
        assert upstream.replica_ejections == 1
        straight = [await embed(f"straight {i}") for i in range(4)]
        by_port[b.port].outstanding -= 5
        assert [tries for tries, _ in straight] == [1, 1, 1, 1]
        assert max(waited for _, waited in straight) < 0.6  # not the slow worker's second
        assert failover.metrics.retries.get("hedge_in_zone") == 2
        assert pool.endpoints[0].available() and pool.endpoints[0].outlier.consecutive_failures == 0
    finally:
        await pool.close()


async def test_the_health_checks_keep_the_zone_in_step_with_its_name(pair):
    a, b = pair
    name = Name(a.port)
    upstream = EdgeUpstream("zone-a", "edge-zone-a", 50051, resolver=name, resolve_interval_s=0.1)
    pool = UpstreamPool([upstream], RoutingConfig())
    await pool.check_once()
    pool.start()
    try:
        name.ports = [a.port, b.port]
        for _ in range(40):
            await asyncio.sleep(0.05)
            if upstream.serving_replicas == 2:
                break
        assert [r.address[1] for r in upstream.replicas.replicas] == [a.port, b.port]
        assert upstream.serving_replicas == 2
        first = upstream.replicas.replicas[0]
        name.ports = [b.port]
        for _ in range(40):
            await asyncio.sleep(0.05)
            if first.conn.closed:
                break
        assert first.conn.closed and upstream.serving_replicas == 1
    finally:
        await pool.close()


async def test_a_rolling_restart_of_the_zone_s_workers_fails_no_request(models):
    olds = [await start_worker(models), await start_worker(models)]
    name = Name(*(w.port for w in olds))
    upstream = zone_edge(name)
    pool = UpstreamPool([upstream], RoutingConfig())
    await pool.check_once()
    retired = list(upstream.replicas.replicas)
    pool.start()
    failures: list[BaseException] = []
    answered = {"embed": 0, "stream": 0}
    unhealthy_seen = 0
    stop = asyncio.Event()

    async def embed_load(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await upstream.embed(EMBED, [f"load {i} {n}"], timeout=10)
                answered["embed"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                failures.append(exc)

    async def stream_load() -> None:
        while not stop.is_set():
            try:
                await stream_text(upstream, "Rolling restarts")
                answered["stream"] += 1
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)

    async def watch_health() -> None:
        nonlocal unhealthy_seen
        while not stop.is_set():
            unhealthy_seen += not pool.endpoints[0].available()
            await asyncio.sleep(0.05)

    load = [asyncio.create_task(embed_load(i)) for i in range(6)]
    load += [asyncio.create_task(stream_load()), asyncio.create_task(watch_health())]
    news = []
    try:
        await asyncio.sleep(0.5)
        for old in olds:  # as a Deployment rolls with maxSurge 1, maxUnavailable 0
            new = await start_worker(models)
            news.append(new)
            name.ports.append(new.port)
            await upstream.replicas.refresh()
            await asyncio.sleep(0.3)
            name.ports.remove(old.port)  # leaves the Service as its SIGTERM arrives
            stopping = asyncio.create_task(old.stop())
            await asyncio.sleep(0.1)
            await upstream.replicas.refresh()
            await stopping
            await asyncio.sleep(0.5)
        before = dict(answered)
        await asyncio.sleep(0.5)
        replicas = list(upstream.replicas.replicas)
    finally:
        stop.set()
        await asyncio.gather(*load)
        await pool.close()
        await asyncio.gather(*(w.stop() for w in news))
    assert not failures, failures[:3]
    assert unhealthy_seen == 0
    assert answered["embed"] > before["embed"] and answered["stream"] > before["stream"] > 0
    assert [r.address[1] for r in replicas] == name.ports and len(name.ports) == 2
    assert all(r.conn.closed for r in replicas)  # pool.close closed them
    assert all(r.conn.closed for r in retired)  # the old workers' channels, once idle
