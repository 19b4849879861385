"""The L2 cache and tenant limits against a real Redis (in-process upstreams stand in for zones)."""

from __future__ import annotations

import asyncio
import copy
import time

import msgspec
import pytest

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.config import parse_topology
from gateway.http import Request
from gateway.redis_link import RedisLink
from gateway.upstreams import UpstreamPool
from tests.support.fakes import FakeUpstream

BASE = {
    "gateway": {"region": "west"},
    "regions": [{"name": "west", "lat": 0, "lon": 0}],
    "zones": [{"name": "zone-a", "region": "west", "address": "127.0.1.1", "edge": {}, "core": {}}],
    "models": [{"name": "embed", "tier": "edge", "kind": "embedding"},
               {"name": "llm", "tier": "core", "kind": "generate"}],
    "auth": {"api_keys": [{"name": "a", "tenant": "tenant-a", "sha256": hash_key("sk-a")},
                          {"name": "b", "tenant": "tenant-b", "sha256": hash_key("sk-b")}]},
}


async def gateway(redis_port: int, *, limits: dict | None = None, prefix_db: int = 0, upstreams=None,
                  cache: dict | None = None):
    raw = copy.deepcopy(BASE)
    raw["redis"] = {"host": "127.0.0.1", "port": redis_port, "db": prefix_db}
    if limits:
        raw["limits"] = limits
    if cache:
        raw["cache"] = cache
    topo = parse_topology(raw)
    ups = upstreams or [FakeUpstream("zone-a", "edge"), FakeUpstream("zone-a", "core")]
    pool = UpstreamPool(ups)
    await pool.check_once()
    link = RedisLink(topo.redis, retry_after=0.2)
    return Gateway(topo, pool, redis=link), ups


def post(path: str, body: dict, key: str = "sk-a", headers: dict | None = None) -> Request:
    h = {"authorization": f"Bearer {key}", **(headers or {})}
    return Request("POST", path, h, msgspec.json.encode(body), "127.0.0.1", "h3")


def text_of(r) -> str:
    return msgspec.json.decode(r.body)["choices"][0]["text"]


@pytest.fixture
async def flushed(redis_server):
    link = RedisLink(parse_topology({"redis": {"port": redis_server.port}}).redis)
    await link.client.flushall()
    await link.close()
    return redis_server


async def test_deterministic_answers_are_cached_per_tenant(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    body = {"model": "llm", "prompt": "hello", "max_tokens": 6, "temperature": 0}
    first = await gw.handle(post("/v1/completions", body))
    again = await gw.handle(post("/v1/completions", body))
    other = await gw.handle(post("/v1/completions", body, key="sk-b"))
    assert [r.headers["x-meridian-cache"] for r in (first, again, other)] == ["miss", "hit", "miss"]
    assert [r.headers.get("x-meridian-attempts") for r in (first, again, other)] == ["1", None, "1"]  # a hit asks no zone
    assert first.body == again.body.replace(msgspec.json.decode(again.body)["id"].encode(),
                                            msgspec.json.decode(first.body)["id"].encode()).replace(
        str(msgspec.json.decode(again.body)["created"]).encode(), str(msgspec.json.decode(first.body)["created"]).encode())
    assert len(core.calls) == 2  # tenant B never sees tenant A's entry


async def test_sampling_without_seed_is_not_cached(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    body = {"model": "llm", "prompt": "hello", "temperature": 0.8}
    r1 = await gw.handle(post("/v1/completions", body))
    r2 = await gw.handle(post("/v1/completions", body))
    assert r1.headers["x-meridian-cache"] == r2.headers["x-meridian-cache"] == "bypass"
    seeded = {**body, "seed": 11}
    await gw.handle(post("/v1/completions", seeded))
    assert (await gw.handle(post("/v1/completions", seeded))).headers["x-meridian-cache"] == "hit"


async def test_stream_is_stored_whole_and_replayed_as_a_stream(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    body = {"model": "llm", "messages": [{"role": "user", "content": "x"}], "temperature": 0, "stream": True}
    first = await gw.handle(post("/v1/chat/completions", body))
    live = b"".join([c async for c in first.stream])
    second = await gw.handle(post("/v1/chat/completions", body))
    assert second.headers["x-meridian-cache"] == "hit"
    replay = b"".join([c async for c in second.stream])

    def text(raw: bytes) -> str:
        events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e.startswith("data: {")]
        return "".join(msgspec.json.decode(e)["choices"][0]["delta"].get("content", "") for e in events)

    assert text(live) == text(replay) == "t0 t1 t2 t3 t4 t5 "
    assert len(core.calls) == 1


async def test_concurrent_identical_misses_collapse_within_and_across_processes(flushed):
    gw1, ups1 = await gateway(flushed.port)
    gw2, ups2 = await gateway(flushed.port)
    for u in ups1 + ups2:
        u.delay = 0.2
    body = {"model": "embed", "input": ["same text"]}
    replies = await asyncio.gather(*(g.handle(post("/v1/embeddings", body)) for g in [gw1, gw2] * 8))
    assert all(r.status == 200 for r in replies)
    assert ups1[0].embed_calls + ups2[0].embed_calls == 1
    assert sorted(r.headers["x-meridian-cache"] for r in replies).count("miss") == 1


async def test_redis_down_bypasses_then_recovers(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    body = {"model": "embed", "input": "recover"}
    flushed.stop()
    try:
        down = [await gw.handle(post("/v1/embeddings", body)) for _ in range(3)]
        assert [r.status for r in down] == [200, 200, 200]
        assert {r.headers["x-meridian-cache"] for r in down} == {"bypass"}
    finally:
        flushed.start()
    await asyncio.sleep(0.3)  # the breaker probes again after its pause
    assert (await gw.handle(post("/v1/embeddings", body))).headers["x-meridian-cache"] == "miss"
    assert (await gw.handle(post("/v1/embeddings", body))).headers["x-meridian-cache"] == "hit"


async def test_requests_per_second_shared_by_two_gateways(flushed):
    limits = {"tenants": {"tenant-a": {"requests_per_second": 5, "burst": 10}}}
    gw1, _ = await gateway(flushed.port, limits=limits)
    gw2, _ = await gateway(flushed.port, limits=limits)
    started = time.monotonic()
    statuses = []
    while time.monotonic() - started < 2.0:
        for g in (gw1, gw2):
            statuses.append((await g.handle(post("/v1/embeddings", {"model": "embed", "input": "x"}))).status)
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    expected = 10 + 5 * elapsed  # the burst plus the refill
    assert abs(admitted - expected) <= 0.1 * expected + 1, (admitted, expected)
    burst = [await gw1.handle(post("/v1/embeddings", {"model": "embed", "input": "x"})) for _ in range(5)]
    refused = [r for r in burst if r.status == 429]
    assert refused and int(refused[0].headers["retry-after"]) >= 1
    assert msgspec.json.decode(refused[0].body)["error"]["type"] == "rate_limit_error"
    # Tenant B has no limit of its own.
    assert (await gw1.handle(post("/v1/embeddings", {"model": "embed", "input": "x"}, key="sk-b"))).status == 200


SAMPLED = {"model": "llm", "prompt": "hello", "temperature": 0.8}  # uncacheable on its own


async def test_an_idempotency_key_replays_the_first_answer(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    key = {"idempotency-key": "order-42"}
    first = await gw.handle(post("/v1/completions", SAMPLED, headers=key))
    again = await gw.handle(post("/v1/completions", {**SAMPLED, "stream": True}, headers=key))  # delivery differs
    assert first.status == again.status == 200
    assert [first.headers["x-meridian-cache"], again.headers["x-meridian-cache"]] == ["miss", "replay"]
    events = [e async for e in again.stream]
    assert b"".join(events).count(b"t0 ") == 1 and events[-1] == b"data: [DONE]\n\n"
    assert len(core.calls) == 1  # generated once
    # Another tenant's key of the same name is its own.
    other = await gw.handle(post("/v1/completions", SAMPLED, key="sk-b", headers=key))
    assert other.headers["x-meridian-cache"] == "miss" and len(core.calls) == 2


async def test_concurrent_duplicates_of_an_idempotent_request_generate_once(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    core.delay = 0.2
    key = {"idempotency-key": "retry-me"}
    replies = await asyncio.gather(*(gw.handle(post("/v1/completions", SAMPLED, headers=key)) for _ in range(3)))
    assert [r.status for r in replies] == [200] * 3
    assert len({text_of(r) for r in replies}) == 1 and len(core.calls) == 1


async def test_an_idempotency_key_is_refused_for_another_request(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    key = {"idempotency-key": "once"}
    assert (await gw.handle(post("/v1/completions", SAMPLED, headers=key))).status == 200
    reused = await gw.handle(post("/v1/completions", {**SAMPLED, "prompt": "other"}, headers=key))
    assert reused.status == 422
    assert msgspec.json.decode(reused.body)["error"]["code"] == "idempotency_key_reused"
    bad = await gw.handle(post("/v1/completions", SAMPLED, headers={"idempotency-key": "x" * 300}))
    assert bad.status == 400


async def test_tokens_per_minute(flushed):
    limits = {"tenants": {"tenant-a": {"tokens_per_minute": 10}}}
    gw, _ = await gateway(flushed.port, limits=limits)
    body = {"model": "llm", "prompt": "p", "temperature": 0.5}  # each answer uses 3 + 6 tokens
    assert (await gw.handle(post("/v1/completions", body))).status == 200
    assert (await gw.handle(post("/v1/completions", body))).status == 200
    refused = await gw.handle(post("/v1/completions", body))
    assert refused.status == 429
    assert msgspec.json.decode(refused.body)["error"]["code"] == "rate_limit_exceeded"


async def test_tokens_per_minute_counts_embedding_tokens(flushed):
    limits = {"tenants": {"tenant-a": {"tokens_per_minute": 10}}}
    gw, _ = await gateway(flushed.port, limits=limits)
    first = await gw.handle(post("/v1/embeddings", {"model": "embed", "input": "y" * 20}))  # 20 tokens
    assert first.status == 200
    refused = await gw.handle(post("/v1/embeddings", {"model": "embed", "input": "z" * 20}))
    assert refused.status == 429, "the first embedding's 20 tokens spent the minute's 10"


@pytest.mark.parametrize("redis_up", [True, False], ids=["redis", "local-fallback"])
async def test_answers_say_what_is_left_of_the_tenant_s_limits(flushed, redis_up):
    # OpenAI's x-ratelimit-* headers: the bucket sizes, what is left, and when each is full again.
    limits = {"tenants": {"tenant-a": {"requests_per_second": 1, "burst": 3, "tokens_per_minute": 60}}}
    gw, _ = await gateway(flushed.port, limits=limits)
    if not redis_up:
        flushed.stop()
    try:
        first = await gw.handle(post("/v1/embeddings", {"model": "embed", "input": "y" * 20}))  # 20 tokens
        second = await gw.handle(post("/v1/embeddings", {"model": "embed", "input": "x"}))
        b = await gw.handle(post("/v1/embeddings", {"model": "embed", "input": "x"}, key="sk-b"))
        third = await gw.handle(post("/v1/embeddings", {"model": "nope", "input": "x"}))  # admitted, then a 404
        refused = await gw.handle(post("/v1/embeddings", {"model": "embed", "input": "x"}))
    finally:
        if not redis_up:
            flushed.start()
    h1, h2, h3 = first.headers, second.headers, third.headers
    assert [r.status for r in (first, second, third, refused)] == [200, 200, 404, 429]
    assert h1["x-ratelimit-limit-requests"] == "3" and h1["x-ratelimit-limit-tokens"] == "60"
    assert [h["x-ratelimit-remaining-requests"] for h in (h1, h2, h3)] == ["2", "1", "0"]
    # Admission is checked before the answer's tokens are debited: the second sees the first's 20.
    assert h1["x-ratelimit-remaining-tokens"] == "60" and h2["x-ratelimit-remaining-tokens"] in ("40", "41")
    assert h3["x-ratelimit-reset-requests"].endswith("s") and float(h3["x-ratelimit-reset-requests"][:-1]) > 2
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and "retry-after" in refused.headers
    assert not any(k.startswith("x-ratelimit") for k in b.headers), "tenant-b has no limits"


async def test_limits_fall_back_to_local_when_redis_is_down(flushed):
    limits = {"tenants": {"tenant-a": {"requests_per_second": 1, "burst": 2}}}
    gw, _ = await gateway(flushed.port, limits=limits)
    flushed.stop()
    try:
        statuses = [(await gw.handle(post("/v1/embeddings", {"model": "embed", "input": "x"}))).status for _ in range(4)]
    finally:
        flushed.start()
    assert statuses == [200, 200, 429, 429]
    assert gw.metrics.limiter_fallback.get() == 1


async def test_cache_control_no_cache_bypasses(flushed):
    gw, (edge, core) = await gateway(flushed.port)
    body = {"model": "llm", "prompt": "fresh", "temperature": 0}
    await gw.handle(post("/v1/completions", body))
    fresh = Request("POST", "/v1/completions", {"authorization": "Bearer sk-a", "cache-control": "no-cache"},
                    msgspec.json.encode(body), "127.0.0.1", "h3")
    r = await gw.handle(fresh)
    assert r.headers["x-meridian-cache"] == "bypass" and len(core.calls) == 2


async def test_l1_answers_repeated_hits_without_redis_and_keeps_tenants_apart(flushed):
    gw, (edge, _) = await gateway(flushed.port)
    body = {"model": "embed", "input": ["l1 text"]}
    first = await gw.handle(post("/v1/embeddings", body))
    flushed.stop()  # from here on only the L1 can answer
    try:
        again = await gw.handle(post("/v1/embeddings", body))
        other = await gw.handle(post("/v1/embeddings", body, key="sk-b"))
    finally:
        flushed.start()
    assert [r.headers["x-meridian-cache"] for r in (first, again, other)] == ["miss", "hit", "bypass"]
    assert again.body == first.body
    assert edge.embed_calls == 2  # tenant B's request went to the edge, not to A's entry


async def test_l1_never_outlives_the_redis_entry(flushed):
    writer, _ = await gateway(flushed.port)
    reader, (edge, _) = await gateway(flushed.port, cache={"l1_ttl_s": 30.0})
    body = {"model": "embed", "input": ["short-lived"]}
    assert (await writer.handle(post("/v1/embeddings", body))).headers["x-meridian-cache"] == "miss"
    link = RedisLink(parse_topology({"redis": {"port": flushed.port}}).redis)
    try:
        [key] = [k for k in await link.client.execute("KEYS", "mrd:c*:*") if not k.endswith(b":lock")]
        await link.client.execute("PEXPIRE", key, 300)
        assert (await reader.handle(post("/v1/embeddings", body))).headers["x-meridian-cache"] == "hit"
        await asyncio.sleep(0.35)  # Redis has forgotten it; the reader's L1 copy must be gone too
        assert (await reader.handle(post("/v1/embeddings", body))).headers["x-meridian-cache"] == "miss"
    finally:
        await link.close()
    assert edge.embed_calls == 1


async def test_l1_ttl_bounds_how_long_a_flushed_entry_is_served(flushed):
    gw, (edge, _) = await gateway(flushed.port, cache={"l1_ttl_s": 0.2})
    body = {"model": "embed", "input": ["flushed"]}
    await gw.handle(post("/v1/embeddings", body))
    link = RedisLink(parse_topology({"redis": {"port": flushed.port}}).redis)
    await link.client.flushall()
    await link.close()
    assert (await gw.handle(post("/v1/embeddings", body))).headers["x-meridian-cache"] == "hit"
    await asyncio.sleep(0.25)
    assert (await gw.handle(post("/v1/embeddings", body))).headers["x-meridian-cache"] == "miss"
    assert edge.embed_calls == 2
