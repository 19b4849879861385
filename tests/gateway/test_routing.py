"""Ranking, outlier detection, retry budget, hedging and stream timeouts, with in-process upstreams."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import pytest

from gateway.app import Gateway
from gateway.config import ConfigError, Model, ModelVersion, RoutingConfig, parse_topology
from gateway.errors import UpstreamFailure
from gateway.failover import ResumableStream, RetryBudget
from gateway.routing import Router
from gateway.upstreams import Endpoint, GenerateChunk, PeakEwma, UpstreamPool
from tests.gateway.test_pipeline import TOPOLOGY, error_of, req
from tests.support.fakes import FakeUpstream


async def gateway_with(routing: dict | None = None):
    raw = {**TOPOLOGY, "routing": routing or {}}
    ups = [FakeUpstream("zone-a", "edge"), FakeUpstream("zone-a", "core"),
           FakeUpstream("zone-b", "edge"), FakeUpstream("zone-b", "core")]
    topo = parse_topology(raw)
    pool = UpstreamPool(ups, topo.routing)
    await pool.check_once()
    return Gateway(topo, pool), ups


def test_peak_ewma_jumps_up_and_decays():
    e = PeakEwma(tau=1.0)
    e.observe(0.001, 100.0)
    e.observe(0.6, 100.5)
    assert e.value == 0.6
    e.observe(0.001, 102.5)  # two time constants later
    assert 0.06 < e.value < 0.1


def test_a_probe_waits_four_round_trips_while_healthy_and_the_whole_timeout_otherwise():
    cfg = RoutingConfig(probe_timeout_min_s=0.25, probe_timeout_s=1.0)
    e = Endpoint(FakeUpstream("z", "core"), cfg)
    assert e.probe_timeout() == 1.0  # never measured
    e.healthy = True
    e.rtt.observe(0.002, 100.0)
    assert e.probe_timeout() == 0.25  # nearby: the floor
    e.rtt.observe(0.15, 100.1)
    assert e.probe_timeout() == pytest.approx(0.6)  # 150 ms away
    e.rtt.observe(0.4, 100.2)
    assert e.probe_timeout() == 1.0  # capped
    e.healthy = False
    e.rtt.observe(0.002, 200.0)
    assert e.probe_timeout() == 1.0  # down: a slower answer must still count


async def test_a_distant_zone_stays_healthy_and_a_slowed_one_is_measured_again():
    config = RoutingConfig(probe_interval_s=0.05, probe_timeout_min_s=0.05, probe_timeout_s=0.5)
    far, near = FakeUpstream("zone-a", "edge"), FakeUpstream("zone-b", "edge")
    far.health_delay = 0.1  # over the minimum timeout, under 4 round trips and the cap
    pool = UpstreamPool([far, near], config)
    await pool.check_once()
    pool.start()
    try:
        await asyncio.sleep(0.6)
        assert all(e.healthy for e in pool.endpoints)
        near.health_delay = 0.1  # slowed: one probe times out, the next (whole timeout) measures it
        await asyncio.sleep(0.6)
        assert pool.endpoints[1].healthy and pool.endpoints[1].rtt.value >= 0.1
    finally:
        await pool.close()


async def test_a_silent_zone_is_seen_down_within_interval_plus_timeout_and_others_keep_their_pace():
    config = RoutingConfig(probe_interval_s=0.1, probe_timeout_min_s=0.1, probe_timeout_s=0.1)
    silent, other = FakeUpstream("zone-a", "edge"), FakeUpstream("zone-b", "edge")
    pool = UpstreamPool([silent, other], config)
    await pool.check_once()
    pool.start()
    try:
        await asyncio.sleep(0.15)
        silent.silent, since, checks = True, time.monotonic(), other.health_checks
        while pool.endpoints[0].healthy:
            await asyncio.sleep(0.005)
        assert time.monotonic() - since <= config.probe_interval_s + config.probe_timeout_s + 0.05
        await asyncio.sleep(1.0 - (time.monotonic() - since))
        # Probed on its own clock, about 10 times a second; waiting on the silent zone's
        # timeouts would have halved that.
        assert other.health_checks - checks >= 8
        assert pool.endpoints[1].healthy
    finally:
        await pool.close()


class _SelfCancellingHealth(FakeUpstream):
    """Health checks that raise CancelledError of their own, as grpc.aio does for a call it cancelled."""

    def __init__(self, zone: str, tier: str) -> None:
        super().__init__(zone, tier)
        self.cancelling_checks = 0

    async def health(self, *, timeout):
        if self.cancelling_checks:
            self.cancelling_checks -= 1
            self.health_checks += 1
            raise asyncio.CancelledError
        return await super().health(timeout=timeout)


async def test_a_probe_that_raises_cancelled_error_fails_and_the_checks_go_on():
    config = RoutingConfig(probe_interval_s=0.05, probe_timeout_min_s=0.05, probe_timeout_s=0.2)
    flaky = _SelfCancellingHealth("zone-a", "core")
    pool = UpstreamPool([flaky], config)
    await pool.check_once()
    pool.start()
    try:
        flaky.cancelling_checks, checks = 3, flaky.health_checks
        await asyncio.sleep(0.12)
        assert flaky.health_checks - checks >= 2 and not pool.endpoints[0].healthy
        checks = flaky.health_checks
        await asyncio.sleep(0.3)
        assert flaky.health_checks - checks >= 3  # still checked on its clock
        assert pool.endpoints[0].healthy
    finally:
        await pool.close()
    assert all(t.cancelled() for t in pool._tasks)  # the loop ends by its own cancellation only


async def test_slow_zone_loses_traffic_then_wins_it_back():
    gw, ups = await gateway_with()
    router, pool = gw.router, gw.pool
    west = gw.topology.region("west")
    assert router.rank("edge", west)[0].zone == "zone-a"
    a = pool.endpoints[0]
    now = time.monotonic()
    a.rtt.observe(0.6, now)  # 300 ms each way
    assert router.rank("edge", west)[0].zone == "zone-b"
    for t in range(1, 6):
        a.rtt.observe(0.001, now + t)
    assert router.rank("edge", west)[0].zone == "zone-a"


async def test_saturated_nearest_zone_spills_over():
    gw, ups = await gateway_with({"zone_capacity": 2})
    west = gw.topology.region("west")
    gw.pool.endpoints[0].in_flight = 2
    assert gw.router.rank("edge", west)[0].zone == "zone-b"
    gw.pool.endpoints[0].in_flight = 1
    assert gw.router.rank("edge", west)[0].zone == "zone-a"
    ups[0].serving_replicas = 2  # the capacity is per serving worker
    gw.pool.endpoints[0].in_flight = 3
    assert gw.router.rank("edge", west)[0].zone == "zone-a"
    gw.pool.endpoints[0].in_flight = 4
    assert gw.router.rank("edge", west)[0].zone == "zone-b"


async def test_with_every_zone_at_its_request_limit_a_request_is_refused_at_once_with_retry_after():
    gw, ups = await gateway_with({"max_requests_per_replica": 2})
    edges = gw.pool.for_tier("edge")
    for e in edges:
        e.in_flight = 2
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}))
    assert r.status == 503 and r.headers["retry-after"] == "1"
    assert error_of(r)["code"] == "overloaded" and error_of(r)["type"] == "server_error"
    assert ups[0].embed_calls == ups[2].embed_calls == 0  # nothing queued behind the full zones
    stream = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "stream": True}))
    assert stream.status == 200  # the core's zones have room: only the full tier refuses
    await stream.stream.aclose()
    assert gw.metrics.overflow.get("edge") == 1
    # A zone with room takes the request, though another zone is nearer; the limit is per replica.
    edges[1].in_flight = 1
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "y"}))
    assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-b"
    ups[0].serving_replicas = 2
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "z"}))
    assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-a"


async def test_a_stream_finds_every_zone_full_before_anything_is_sent():
    gw, ups = await gateway_with({"max_requests_per_replica": 1})
    for e in gw.pool.for_tier("core"):
        e.in_flight = 1
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "stream": True}))
    assert r.status == 503 and error_of(r)["code"] == "overloaded"
    assert not ups[1].calls and not ups[3].calls
    unlimited, _ = await gateway_with({"max_requests_per_replica": 0})
    for e in unlimited.pool.for_tier("core"):
        e.in_flight = 10_000
    r = await unlimited.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "max_tokens": 2}))
    assert r.status == 200


def test_a_negative_request_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="max_requests_per_replica"):
        parse_topology({**TOPOLOGY, "routing": {"max_requests_per_replica": -1}})


def test_ejection_interval_doubles_and_hard_failures_eject_at_once():
    cfg = RoutingConfig(consecutive_failures=2, base_ejection_s=1.0, max_ejection_s=3.0)
    e = Endpoint(FakeUpstream("z", "edge"), cfg)
    e.healthy = True
    assert e.record_failure(hard=False) is False and e.available()
    assert e.record_failure(hard=False) is True and not e.available()
    first = e.outlier.ejected_until - time.monotonic()
    e.outlier.ejected_until = time.monotonic()  # as if the interval had just passed
    e.record_failure(hard=False)
    e.record_failure(hard=False)
    second = e.outlier.ejected_until - time.monotonic()
    assert 0.9 < first <= 1.0 and 1.9 < second <= 2.0
    e.outlier.ejected_until = time.monotonic()  # as if the interval had just passed
    e.record_failure(hard=False)
    e.record_failure(hard=False)
    assert 2.9 < e.outlier.ejected_until - time.monotonic() <= 3.0  # 4 s, capped at 3
    fresh = Endpoint(FakeUpstream("z", "edge"), cfg)
    fresh.healthy = True
    assert fresh.record_failure(hard=True) and not fresh.healthy


async def test_hedged_embedding_answers_from_the_next_zone():
    gw, ups = await gateway_with({"hedge_after_s": 0.05})
    ups[0].delay = 1.0
    started = time.perf_counter()
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}))
    assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-b"
    assert r.headers["x-meridian-attempts"] == "2"  # the first try and its hedge
    assert time.perf_counter() - started < 0.5
    assert gw.metrics.retries.get("hedge") == 1


async def test_a_large_embedding_request_is_not_hedged():
    gw, ups = await gateway_with({"hedge_after_s": 0.05, "hedge_max_chars": 100})
    ups[0].delay = 0.3
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": ["x" * 60, "y" * 41]}))
    assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-a" and r.headers["x-meridian-attempts"] == "1"
    assert ups[2].embed_calls == 0 and gw.metrics.retries.get("hedge") == 0
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": ["x" * 60, "y" * 40]}))
    assert r.headers["x-meridian-zone"] == "zone-b"  # at the limit: hedged


async def test_a_zone_with_another_serving_replica_takes_the_hedge_itself_and_is_not_charged():
    # The first try's replica is slow; the zone has another that serves: the hedge stays in the
    # zone (no cross-region trip) and the zone, which answered, is not charged for its slow replica.
    gw, ups = await gateway_with({"hedge_after_s": 0.05, "retry_budget_min_per_s": 100.0})
    zone_a = ups[0]
    zone_a.serving_replicas = 2
    delays = iter([1.0, 0.0] * 4)  # each request: a slow replica, then a quick one
    answer = FakeUpstream.embed

    async def embed(model, inputs, **kw):
        zone_a.delay = next(delays)
        return await answer(zone_a, model, inputs, **kw)

    zone_a.embed = embed
    for i in range(4):
        started = time.perf_counter()
        r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": f"x{i}"}))
        assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-a"
        assert r.headers["x-meridian-attempts"] == "2"
        assert time.perf_counter() - started < 0.5
    assert ups[2].embed_calls == 0
    assert gw.metrics.retries.get("hedge_in_zone") == 4 and gw.metrics.retries.get("hedge") == 0
    home = next(e for e in gw.pool.endpoints if e.zone == "zone-a" and e.tier == "edge")
    assert home.available() and home.outlier.consecutive_failures == 0


async def test_a_slow_zone_is_charged_once_for_a_request_its_two_replicas_both_lost():
    gw, ups = await gateway_with({"hedge_after_s": 0.05, "retry_budget_min_per_s": 100.0})
    ups[0].serving_replicas, ups[0].delay = 2, 1.0  # both replicas slow: zone-b answers the third try
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}))
    assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-b"
    assert r.headers["x-meridian-attempts"] == "3"
    assert gw.metrics.retries.get("hedge_in_zone") == 1 and gw.metrics.retries.get("hedge") == 1
    home = next(e for e in gw.pool.endpoints if e.zone == "zone-a" and e.tier == "edge")
    assert home.outlier.consecutive_failures == 1 and home.available()  # one failure, not an ejection


async def test_a_hedge_that_loses_to_the_first_try_is_not_counted_against_its_zone():
    # Both zones slow alike (load, not sickness): the first try answers before the hedge sent
    # 50 ms after it. The backup zone did nothing wrong and must stay in rotation.
    gw, ups = await gateway_with({"hedge_after_s": 0.05, "retry_budget_min_per_s": 100.0})
    ups[0].delay = ups[2].delay = 0.15
    for i in range(4):
        r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": f"x{i}"}))
        assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-a"
        assert r.headers["x-meridian-attempts"] == "2"
    backup = next(e for e in gw.pool.endpoints if e.zone == "zone-b" and e.tier == "edge")
    assert gw.metrics.retries.get("hedge") == 4
    assert backup.available() and backup.outlier.consecutive_failures == 0
    assert gw.metrics.ejections.get("zone-b", "edge") == 0


async def test_retry_budget_stops_retry_storms():
    budget = RetryBudget(ratio=0.1, min_per_s=0.0, window_s=10)
    spent = sum(budget.try_spend() for _ in range(5))
    assert spent == 1  # the floor of one
    for _ in range(20):
        budget.on_request()
    assert sum(budget.try_spend() for _ in range(5)) == 2


async def test_stalled_stream_resumes_elsewhere():
    gw, ups = await gateway_with({"chunk_gap_timeout_s": 0.2})
    original = ups[1].generate

    async def stalls(call, *, timeout):
        async for chunk in original(call, timeout=timeout):
            yield chunk
            if chunk.token_ids == [2]:
                await asyncio.sleep(30)

    ups[1].generate = stalls
    body = {"model": "llm", "prompt": "p", "stream": True, "max_tokens": 6, "seed": 1}
    r = await gw.handle(req("POST", "/v1/completions", body))
    assert r.headers["x-meridian-attempts"] == "1"  # opened on the first try; the resume comes later
    raw = b"".join([c async for c in r.stream]).decode()
    events = [msgspec.json.decode(e.removeprefix("data: ")) for e in raw.split("\n\n") if e.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == "t0 t1 t2 t3 t4 t5 "
    assert ": meridian-resumed 1" in raw
    assert ups[3].calls[0].prefix_token_ids == (0, 1, 2)
    assert gw.metrics.resumed.get("core") == 1
    # The same, not streamed: the header is written once the whole answer is in, resumes counted.
    unstreamed = await gw.handle(req("POST", "/v1/completions", {**body, "stream": False, "seed": 2}))
    assert unstreamed.status == 200 and unstreamed.headers["x-meridian-attempts"] == "2"


@pytest.mark.parametrize("stalls", [1, 2], ids=["once", "twice"])
async def test_a_stall_in_a_zone_of_several_replicas_is_tried_again_there_first(stalls):
    # Two serving replicas behind zone-a's core: the first stall resumes in zone-a (on its other
    # replica, which the replica set picks), uncharged; a second stall there is the zone's.
    gw, ups = await gateway_with({"chunk_gap_timeout_s": 0.2})
    home = ups[1]
    home.serving_replicas = 2
    answer = FakeUpstream.generate

    async def stalls_on_the_first_tries(call, *, timeout):
        try_number = len(home.calls)
        async for chunk in answer(home, call, timeout=timeout):
            yield chunk
            if try_number < stalls and chunk.token_ids:
                await asyncio.sleep(30)

    home.generate = stalls_on_the_first_tries
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "seed": 1}))
    assert r.status == 200 and msgspec.json.decode(r.body)["choices"][0]["text"] == "t0 t1 t2 t3 t4 t5 "
    assert len(home.calls) == 2 and len(ups[3].calls) == stalls - 1
    assert gw.metrics.resumed.get("core") == stalls
    assert gw.metrics.upstream_errors.get("zone-a", "core") == (0 if stalls == 1 else 1)


async def test_a_stall_in_a_zone_of_one_replica_moves_to_the_next_zone():
    gw, ups = await gateway_with({"chunk_gap_timeout_s": 0.2})
    answer = FakeUpstream.generate

    async def stalls_once(call, *, timeout):
        async for chunk in answer(ups[1], call, timeout=timeout):
            yield chunk
            if not call.prefix_token_ids and chunk.token_ids:
                await asyncio.sleep(30)

    ups[1].generate = stalls_once
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "seed": 1}))
    assert r.status == 200 and (len(ups[1].calls), len(ups[3].calls)) == (1, 1)
    assert gw.metrics.upstream_errors.get("zone-a", "core") == 1


def test_canary_weights():
    topo = parse_topology(TOPOLOGY)
    model = Model(name="m", tier="core", kind="generate",
                  versions=[ModelVersion("1", 90), ModelVersion("2", 10)])
    router = Router(topo, UpstreamPool([]), rng=random.Random(5))
    picks = [router.version(model) for _ in range(2000)]
    assert 0.07 < picks.count("2") / len(picks) < 0.13


def test_canary_versions_of_an_edge_model_are_a_config_error():
    # An edge worker serves one version of a model: weights there would split the cache, not traffic.
    raw = {**TOPOLOGY, "models": [*TOPOLOGY["models"], {"name": "e2", "tier": "edge", "kind": "embedding",
                                                        "versions": [{"name": "1", "weight": 90}, {"name": "2", "weight": 10}]}]}
    with pytest.raises(ConfigError, match="e2: versions"):
        parse_topology(raw)


async def test_unavailable_zone_fails_no_request_when_another_is_healthy():
    gw, ups = await gateway_with()
    ups[0].fail = ups[1].fail = True
    replies = [await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": str(i)})) for i in range(20)]
    assert [r.status for r in replies] == [200] * 20
    # Tried zone-a and retried in zone-b until zone-a was ejected, then straight to zone-b.
    assert replies[0].headers["x-meridian-attempts"] == "2" and replies[-1].headers["x-meridian-attempts"] == "1"


async def test_panic_routing_when_every_probe_fails_but_zones_answer():
    gw, ups = await gateway_with()
    for e in gw.pool.endpoints:
        e.healthy = False  # a starved machine answered its probes too late
    for u in ups:
        u.delay = 0.2  # longer than the stream's 50 ms endpoint watch
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}))
    assert r.status == 200
    # Streams too: an endpoint that was already failing its probes when the stream opened is not
    # "going down mid-stream".
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"}))
    assert r.status == 200, r.body
    assert msgspec.json.decode(r.body)["choices"][0]["text"] == "t0 t1 t2 t3 t4 t5 "


def in_flight(gw: Gateway) -> list[int]:
    return [e.in_flight for e in gw.pool.endpoints]


async def test_a_client_that_leaves_before_the_first_token_gives_its_slot_back():
    gw, ups = await gateway_with()
    ups[1].delay = 1.0  # the core is slow to its first token
    for _ in range(3):
        task = asyncio.ensure_future(gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"})))
        await asyncio.sleep(0.05)
        task.cancel()  # the listener cancels the handler of a client that went away
        with pytest.raises(asyncio.CancelledError):
            await task
    assert in_flight(gw) == [0, 0, 0, 0]


async def test_a_request_timeout_before_the_first_token_gives_its_slot_back():
    raw = {**TOPOLOGY, "gateway": {**TOPOLOGY["gateway"], "request_timeout_s": 0.1}}
    topo = parse_topology(raw)
    ups = [FakeUpstream("zone-a", "edge"), FakeUpstream("zone-a", "core")]
    ups[1].delay = 1.0
    pool = UpstreamPool(ups, topo.routing)
    await pool.check_once()
    gw = Gateway(topo, pool)
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"}))
    assert r.status == 504
    assert in_flight(gw) == [0, 0]


async def test_a_stream_that_finds_no_zone_to_resume_in_counts_its_slot_once():
    gw, ups = await gateway_with()
    ups[1].fail_after = 2  # dies mid-stream
    gw.pool.endpoints[3].healthy = False  # and the other zone's core is out of rotation
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"}))
    assert r.status == 503
    assert error_of(r)["message"] == "every zone failed"
    assert in_flight(gw) == [0, 0, 0, 0]


@pytest.mark.parametrize("zone_still_serves", [True, False], ids=["zone-serves", "zone-down"])
async def test_a_stream_that_lost_one_replica_resumes_in_its_zone_while_the_zone_serves(zone_still_serves):
    # The replica set says "one replica lost, others serve" (in_zone): the stream goes on in the
    # same zone, uncharged; had the zone gone down meanwhile, it goes to the next zone as ever.
    gw, ups = await gateway_with()
    home = ups[1]
    answer = FakeUpstream.generate

    async def loses_a_replica_once(call, *, timeout):
        async for chunk in answer(home, call, timeout=timeout):
            if not call.prefix_token_ids and chunk.token_ids == [2]:
                gw.pool.endpoints[1].healthy = zone_still_serves
                raise UpstreamFailure("replica reset; another replica serves", hard=True, in_zone=True)
            yield chunk

    home.generate = loses_a_replica_once
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "seed": 1}))
    assert r.status == 200 and msgspec.json.decode(r.body)["choices"][0]["text"] == "t0 t1 t2 t3 t4 t5 "
    resumed_in = "zone-a" if zone_still_serves else "zone-b"
    assert [c.prefix_token_ids for c in (home.calls + ups[3].calls)] == [(), (0, 1)]
    assert (len(home.calls), len(ups[3].calls)) == ((2, 0) if resumed_in == "zone-a" else (1, 1))
    charged = gw.metrics.upstream_errors.get("zone-a", "core")
    assert charged == (0 if zone_still_serves else 1)  # a replica's loss is not the zone's failure


async def test_a_streamed_answer_closed_unread_frees_its_upstream():
    """A listener whose client left before the first byte was written closes the answer unread."""
    gw, ups = await gateway_with()
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "stream": True}))
    assert r.status == 200 and in_flight(gw)[1] == 1
    await r.stream.aclose()
    assert in_flight(gw) == [0, 0, 0, 0]


async def test_a_stalled_upstream_stream_can_be_closed_at_once():
    # The stall ends the wait for the next chunk; closing the upstream stream must then work at
    # once (it ends the call upstream), not fail because the abandoned wait still runs it.
    closed = asyncio.Event()

    async def stalls():
        try:
            yield GenerateChunk("a", [1])
            await asyncio.Event().wait()
        finally:
            closed.set()

    stream = stalls()
    endpoint = Endpoint(FakeUpstream("z", "core"), RoutingConfig())
    await anext(stream)
    with pytest.raises(UpstreamFailure, match="stalled"):
        await ResumableStream._next(stream, 0.1, endpoint, watch=False)
    await stream.aclose()
    assert closed.is_set()


def test_an_endpoint_s_changes_of_health_are_logged_once_each():
    from tests.gateway.test_replicas import Records

    e = Endpoint(FakeUpstream("zone-a", "edge"), RoutingConfig())
    with Records("meridian.gateway.health") as logs:
        for t, ok in enumerate((True, True, False, False, True)):
            e.record_probe(ok, 0.001, 100.0 + t)
    assert logs.messages == ["endpoint failed its health check", "endpoint healthy"]
    down_at_start = Endpoint(FakeUpstream("zone-b", "edge"), RoutingConfig())
    with Records("meridian.gateway.health") as logs:
        down_at_start.record_probe(False, 0.0, 100.0)
        down_at_start.record_probe(False, 0.0, 100.5)
    assert logs.messages == ["endpoint failed its health check"]
