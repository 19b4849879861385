"""0-RTT: resumed sessions send replay-safe requests as early data, and never anything else."""

from __future__ import annotations

import asyncio
import stat

from aioquic.tls import Epoch

import mobile
from tests.mobile.fake_gateway import client_kwargs, running, spy_on_stream_epochs


async def _fresh_then_resumed(gw, tmp_path, calls):
    """Run `calls(client)` on a new connection, then again on a resumed one (a later app start)."""
    url = f"https://127.0.0.1:{gw.https_port}"
    async with mobile.Client(url, **client_kwargs(gw, tmp_path)) as c:
        await c.models.list()
        await asyncio.sleep(0.05)  # the ticket is written off the event loop
    async with mobile.Client(url, **client_kwargs(gw, tmp_path)) as c:
        return await calls(c)


async def test_replay_safe_requests_go_as_0rtt_and_unsafe_ones_never(tmp_path, monkeypatch):
    async with running(tmp_path) as gw:
        spy_on_stream_epochs(monkeypatch, gw)

        async def calls(c):
            # Each on its own resumed connection's first flight, where 0-RTT is possible at all.
            return await c.completions.create(model="m", prompt="not idempotent")

        unsafe = await _fresh_then_resumed(gw, tmp_path, calls)
        keyed = await _fresh_then_resumed(
            gw, tmp_path, lambda c: c.completions.create(model="m", prompt="keyed", idempotency_key="k-1"))
        listed = await _fresh_then_resumed(gw, tmp_path, lambda c: c.models.list())

    assert not unsafe.meta.early_data
    assert keyed.meta.early_data and listed.meta.early_data
    posts = [s for s in gw.seen if s.method == "POST"]
    plain = [s for s in posts if "idempotency-key" not in s.headers]
    assert plain and all(gw.epochs_of(s) == {Epoch.ONE_RTT} for s in plain), "a non-idempotent POST went as 0-RTT"
    keyed_seen = [s for s in posts if s.headers.get("idempotency-key") == "k-1"]
    assert Epoch.ZERO_RTT in gw.epochs_of(keyed_seen[0])
    resumed_gets = [s for s in gw.seen if s.method == "GET" and Epoch.ZERO_RTT in gw.epochs_of(s)]
    assert resumed_gets, "no GET was sent as 0-RTT on a resumed connection"


async def test_auto_idempotency_key_makes_completions_replay_safe(tmp_path, monkeypatch):
    async with running(tmp_path) as gw:
        spy_on_stream_epochs(monkeypatch, gw)
        url = f"https://127.0.0.1:{gw.https_port}"
        async with mobile.Client(url, **client_kwargs(gw, tmp_path)) as c:
            await c.models.list()
            await asyncio.sleep(0.05)
        async with mobile.Client(url, **client_kwargs(gw, tmp_path, auto_idempotency_key=True)) as c:
            answer = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.meta.early_data and answer.text == "hello"
    post = [s for s in gw.seen if s.method == "POST"][0]
    assert len(post.headers["idempotency-key"]) == 32
    assert Epoch.ZERO_RTT in gw.epochs_of(post)


async def test_tickets_stored_0600_and_single_use(tmp_path, monkeypatch):
    async with running(tmp_path) as gw:
        url = f"https://127.0.0.1:{gw.https_port}"
        async with mobile.Client(url, **client_kwargs(gw, tmp_path)) as c:
            await c.models.list()
            await asyncio.sleep(0.05)
        files = list((tmp_path / "tickets").iterdir())
        assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "tickets").stat().st_mode) == 0o700
        async with mobile.Client(url, **client_kwargs(gw, tmp_path)) as c:
            # The server's fresh ticket would land in the same file (one per server) and hide
            # whether the used one was deleted: this connection keeps no new tickets.
            monkeypatch.setattr(c.transport.h3, "_new_ticket", lambda ticket: None)
            first = await c.models.list()
            second = await c.models.list()  # same connection, after the handshake: 1-RTT
            await asyncio.sleep(0.05)
        assert first.meta.early_data and not second.meta.early_data
        assert c.transport.h3.handshakes == 1
        # The ticket was spent by the resumption, so nothing is left to resume with again.
        assert list((tmp_path / "tickets").iterdir()) == []
