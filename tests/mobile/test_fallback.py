"""HTTP/3 first, HTTP/1.1 over TLS when UDP is blocked; the choice is remembered per server."""

from __future__ import annotations

import asyncio
import time

import pytest

import mobile
from mobile import racing
from mobile.racing import ProtocolMemory
from tests.gateway.test_pipeline import KEY
from tests.support.h3 import h3_client
from tests.support.listeners import tls_listeners
from tests.mobile.fake_gateway import client_kwargs, running


async def test_udp_blocked_falls_back_to_h1_within_one_handshake_timeout(tmp_path):
    async with running(tmp_path) as gw:
        gw.udp_enabled = False  # every datagram dropped: a firewall that blocks UDP
        url = f"https://127.0.0.1:{gw.https_port}"
        timeouts = mobile.Timeouts(handshake_s=1.0)
        async with mobile.Client(url, **client_kwargs(gw, tmp_path, timeouts=timeouts)) as c:
            start = time.perf_counter()
            answer = await c.completions.create(model="m", prompt="hi")
            elapsed = time.perf_counter() - start
            assert answer.meta.protocol == "http/1.1" and answer.text == "hello"
            assert elapsed < timeouts.handshake_s
            await asyncio.sleep(1.0)  # the QUIC attempt has timed out by now: remembered
            assert c.transport.memory.use_h1(c.transport.h3.server)
            start = time.perf_counter()
            listed = await c.models.list()
            assert listed.meta.protocol == "http/1.1"
            assert time.perf_counter() - start < 0.2  # straight to HTTP/1.1, no new race
    assert all(s.protocol == "http/1.1" for s in gw.seen)


async def test_quic_preferred_when_both_work(tmp_path):
    async with running(tmp_path) as gw:
        url = f"https://127.0.0.1:{gw.https_port}"
        async with mobile.Client(url, **client_kwargs(gw, tmp_path)) as c:
            answers = [await c.completions.create(model="m", prompt="hi") for _ in range(3)]
    assert [a.meta.protocol for a in answers] == ["h3"] * 3
    assert not c.transport.memory.use_h1(c.transport.h3.server)


async def test_http1_only_and_plain_http_urls(tmp_path):
    async with running(tmp_path) as gw:
        url = f"https://127.0.0.1:{gw.https_port}"
        async with mobile.Client(url, **client_kwargs(gw, tmp_path, http3=False)) as c:
            stream = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
            assert [ch.text async for ch in stream] == ["hel", "lo"]
            # keep-alive: the next request reuses the connection
            await c.models.list()
            assert c.transport.h1.handshakes == 1


def test_protocol_memory_expires():
    now = [0.0]
    memory = ProtocolMemory(ttl_s=10, clock=lambda: now[0])
    memory.quic_failed("gw:443")
    assert memory.use_h1("gw:443") and not memory.use_h1("other:443")
    now[0] = 10.0
    assert not memory.use_h1("gw:443")  # try QUIC again: the network may have changed
    memory.quic_failed("gw:443")
    memory.quic_worked("gw:443")
    assert not memory.use_h1("gw:443")


async def test_nothing_reachable_is_a_connect_error(tmp_path):
    async with running(tmp_path) as gw:
        gw.udp_enabled = False
        port = gw.https_port
    # both listeners closed now
    kw = client_kwargs(gw, tmp_path, timeouts=mobile.Timeouts(handshake_s=0.5),
                       retry=mobile.RetryPolicy(max_attempts=2, base_delay_s=0.01))
    async with mobile.Client(f"https://127.0.0.1:{port}", **kw) as c:
        with pytest.raises(mobile.ConnectError) as err:
            await c.models.list()
    # Nothing reached the server, so the error says so and the request was tried again.
    assert not err.value.sent
    assert c.transport.h1.handshakes == 2  # one TCP attempt per try: both tries were made


def test_bad_arguments_are_clear():
    with pytest.raises(mobile.ConfigError, match="base_url"):
        mobile.Client("ftp://x")
    with pytest.raises(mobile.ConfigError, match="prefer_local"):
        mobile.Client("https://x", prefer_local=True)
    with pytest.raises(mobile.ConfigError, match="not both"):
        mobile.Client("https://x", api_key="a", token_provider=lambda r: "b")
    with pytest.raises(mobile.ConfigError, match="no protocol"):
        mobile.Client("http://x", http1=False)


async def test_a_gateway_at_its_quic_connection_limit_is_served_over_http1_and_quic_tried_again_soon(
        tmp_path, monkeypatch):
    # The real gateway's listeners, holding one QUIC connection at most, and that one taken: the SDK's
    # QUIC handshake is refused (CONNECTION_REFUSED), the request goes over HTTPS/1.1, and QUIC is
    # tried again after REFUSED_RETRY_S, not after the 5 minutes a blocked path is avoided for.
    monkeypatch.setattr(racing, "REFUSED_RETRY_S", 1.5)
    async with tls_listeners(tmp_path, max_connections=1) as on:
        h3_port, url = on.h3.port, f"https://127.0.0.1:{on.https.port}"
        kw = dict(api_key=KEY, h3_port=h3_port, ca_file=str(on.cert), ticket_dir=tmp_path / "tickets",
                  migration_check_s=None)
        async with mobile.Client(url, **kw) as c:
            async with h3_client("127.0.0.1", h3_port, KEY):  # the one QUIC connection, held
                listed = await c.models.list()
                assert listed.meta.protocol == "http/1.1"
                # aioquic reports a close once its draining period is over (3 PTO, about 0.6 s here,
                # longer on a busy machine): polled, within REFUSED_RETRY_S of the refusal.
                for _ in range(26):
                    if c.transport.memory.use_h1(c.transport.h3.server):
                        break
                    await asyncio.sleep(0.05)
                assert c.transport.memory.use_h1(c.transport.h3.server)
            await asyncio.sleep(1.9)  # past REFUSED_RETRY_S from the refusal, and the held connection closed
            assert (await c.models.list()).meta.protocol in ("h3", "http/1.1")  # the race runs again
            await asyncio.sleep(0.3)
            assert (await c.models.list()).meta.protocol == "h3"
