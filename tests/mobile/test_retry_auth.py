"""Retries with jittered backoff that honour Retry-After, timeouts, cancellation, token refresh."""

from __future__ import annotations

import asyncio
import email.utils
import random

import pytest

import mobile
from mobile.errors import ConnectError, RequestTimeout, TransportError, api_error
from mobile.retry import RetryPolicy, parse_retry_after
from tests.mobile.fake_gateway import Reply, client_kwargs, default_app, running


def test_backoff_is_jittered_exponential_and_capped():
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=4.0)
    rng = random.Random(1)
    for attempt in range(8):
        cap = min(4.0, 0.5 * 2 ** attempt)
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # spread over the whole window, not fixed


def test_what_is_retried():
    policy = RetryPolicy(max_attempts=3)
    limited = api_error(429, "slow down", retry_after=7)
    assert policy.delay(limited, 0, replay_safe=False) == 7  # Retry-After wins over backoff
    assert policy.delay(api_error(429, "x", retry_after=3600), 0, replay_safe=False) is None
    assert policy.delay(api_error(503, "x"), 0, replay_safe=False) is not None
    assert policy.delay(api_error(400, "bad"), 0, replay_safe=True) is None
    assert policy.delay(api_error(500, "bug"), 0, replay_safe=True) is None
    # Never sent: always safe to retry. Maybe sent: only when replay-safe.
    assert policy.delay(ConnectError("down"), 0, replay_safe=False) is not None
    assert policy.delay(TransportError("cut", sent=True), 0, replay_safe=False) is None
    assert policy.delay(TransportError("cut", sent=True), 0, replay_safe=True) is not None
    assert policy.delay(ConnectError("down"), 2, replay_safe=True) is None  # attempts used up


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_429_retried_after_retry_after(tmp_path):
    calls = []

    def app(seen):
        calls.append(seen)
        if len(calls) <= 2:
            return Reply(429, {"retry-after": "0", "content-type": "application/json"},
                         [b'{"error": {"message": "rate limited", "type": "rate_limit_error"}}'])
        return default_app(seen)

    async with running(tmp_path, app) as gw:
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **client_kwargs(gw, tmp_path)) as c:
            answer = await c.completions.create(model="m", prompt="hi")
            assert answer.meta.attempts == 3
            calls.clear()
            c._retry = RetryPolicy(max_attempts=2)
            with pytest.raises(mobile.RateLimitError) as err:
                await c.completions.create(model="m", prompt="hi")
    assert err.value.retry_after == 0 and err.value.message == "rate limited"


async def test_token_provider_asked_again_after_401(tmp_path):
    asked = []

    def provider(refresh: bool) -> str:
        asked.append(refresh)
        return "fresh" if refresh else "stale"

    def app(seen):
        if seen.headers.get("authorization") != "Bearer fresh":
            return Reply(401, {"content-type": "application/json"},
                         [b'{"error": {"message": "bad key", "type": "authentication_error"}}'])
        return default_app(seen)

    async with running(tmp_path, app) as gw:
        kw = client_kwargs(gw, tmp_path, api_key=None, token_provider=provider)
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **kw) as c:
            assert (await c.models.list()).data[0].id == "m"
            await c.models.list()
        assert asked == [False, True]

        async def same_token(refresh: bool) -> str:
            return "stale"

        kw = client_kwargs(gw, tmp_path, api_key=None, token_provider=same_token)
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **kw) as c:
            with pytest.raises(mobile.AuthenticationError):
                await c.models.list()


async def test_request_timeout_and_cancellation(tmp_path):
    def slow(seen):
        reply = default_app(seen)
        reply.delay_s = 5.0
        return reply

    async with running(tmp_path, slow) as gw:
        kw = client_kwargs(gw, tmp_path, retry=RetryPolicy(max_attempts=1))
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **kw) as c:
            await c.transport.h3.connect()
            with pytest.raises(RequestTimeout):
                await c.completions.create(model="m", prompt="hi", timeout=0.2)
            task = asyncio.ensure_future(c.completions.create(model="m", prompt="hi"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Both abandoned streams were reset, none is left waiting on the connection.
            assert c.transport.h3.connection.streams == {}


async def test_stream_closed_early_cancels_it(tmp_path):
    async with running(tmp_path) as gw:
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **client_kwargs(gw, tmp_path)) as c:
            stream = await c.completions.create(model="m", prompt="hi", stream=True)
            first = await stream.__anext__()
            await stream.aclose()
            assert first.text == "hel"
            assert c.transport.h3.connection.streams == {}
