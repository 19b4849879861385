"""Retries with jittered backoff that honour Retry-After, timeouts, cancellation, token refresh."""

from __future__ import annotations

import asyncio
import email.utils
import gc
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


def _slow_body(seen):
    reply = default_app(seen)
    reply.chunk_delay_s = 0.3
    return reply


async def test_stream_left_early_without_aclose_is_cancelled(tmp_path):
    async with running(tmp_path, _slow_body) as gw:
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **client_kwargs(gw, tmp_path)) as c:
            await c.transport.h3.connect()
            stream = await c.completions.create(model="m", prompt="hi", stream=True)
            async for chunk in stream:
                break  # the app has what it needs and drops the stream, no aclose()
            assert chunk.text == "hel"
            del stream
            gc.collect()
            await asyncio.sleep(0.1)
            proto = c.transport.h3.connection
            assert proto.streams == {}
            assert (gw.seen[-1].conn, gw.seen[-1].stream_id) in gw.cancelled  # the server was told to stop


async def test_body_read_timeout_cancels_the_stream(tmp_path):
    async with running(tmp_path, _slow_body) as gw:
        kw = client_kwargs(gw, tmp_path, timeouts=mobile.Timeouts(read_s=0.1), retry=RetryPolicy(max_attempts=1))
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **kw) as c:
            await c.transport.h3.connect()
            with pytest.raises(RequestTimeout):
                await c.completions.create(model="m", prompt="hi")  # headers come, the body stalls
            await asyncio.sleep(0.1)
            assert c.transport.h3.connection.streams == {}
            assert (gw.seen[-1].conn, gw.seen[-1].stream_id) in gw.cancelled


class _CutGateway:
    """A plain HTTP/1.1 server that reads each request and answers only the first `answered` of a
    connection; on the next it drops the connection unanswered (reset or close), as a crashing or
    restarting gateway does after it took the request."""

    def __init__(self, *, answered: int, reset: bool) -> None:
        self.answered, self.reset = answered, reset
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for served in range(self.answered + 1):
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            except asyncio.IncompleteReadError:
                return
            headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
            await reader.readexactly(int(headers.get("content-length", 0)))
            self.requests.append((head[0].split(" ")[0], headers))
            if served == self.answered:
                break
            body = b'{"object":"list","data":[]}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
        await asyncio.sleep(0.02)
        writer.transport.abort() if self.reset else writer.close()

    def posts(self) -> int:
        return sum(method == "POST" for method, _ in self.requests)


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
async def test_h1_post_cut_after_it_was_flushed_is_delivered_once(reset):
    gw = _CutGateway(answered=0, reset=reset)
    server = await asyncio.start_server(gw.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with mobile.Client(url, api_key="k", retry=RetryPolicy(base_delay_s=0.01)) as c:
            with pytest.raises(TransportError) as err:
                await c.completions.create(model="m", prompt="charge my card once", max_tokens=5)
    finally:
        server.close()
    assert gw.posts() == 1
    assert err.value.sent is True  # it may have run: the app must not be told it is safe to resend


async def test_h1_stale_kept_alive_connection_resends_only_replay_safe_requests():
    gw = _CutGateway(answered=1, reset=False)  # each connection: one answer, then cut on the next request
    server = await asyncio.start_server(gw.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        # One attempt only: whatever is resent here is resent by the transport's stale-connection retry.
        async with mobile.Client(url, api_key="k", retry=RetryPolicy(max_attempts=1)) as c:
            await c.models.list()
            assert (await c.models.list()).meta.protocol == "http/1.1"  # GET: cut on the stale one, resent
            await c.embeddings.create(model="e", input="x", idempotency_key="once")  # keyed POST: resent too
            with pytest.raises(TransportError) as err:
                await c.completions.create(model="m", prompt="send the payment", max_tokens=5)
    finally:
        server.close()
    keyed = [h for m, h in gw.requests if m == "POST" and h.get("idempotency-key") == "once"]
    unkeyed = [h for m, h in gw.requests if m == "POST" and "idempotency-key" not in h]
    assert len(keyed) == 2 and len(unkeyed) == 1 and err.value.sent is True
