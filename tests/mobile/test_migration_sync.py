"""Connection migration when the local address changes; the blocking SyncClient."""

from __future__ import annotations

import asyncio

import mobile
from tests.mobile.fake_gateway import client_kwargs, running


async def test_connection_migrates_to_a_new_local_socket(tmp_path):
    async with running(tmp_path) as gw:
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **client_kwargs(gw, tmp_path)) as c:
            await c.completions.create(model="m", prompt="before")
            h3 = c.transport.h3
            before, conn = h3.local_address(), h3.connection
            stream = await c.completions.create(model="m", prompt="during", stream=True)
            assert await c.network_changed()  # e.g. Wi-Fi -> cellular: a new local address/port
            after_answer = await c.completions.create(model="m", prompt="after")
            assert [ch.text async for ch in stream] == ["hel", "lo"]
            assert h3.local_address() != before and h3.connection is conn and h3.handshakes == 1
    assert after_answer.meta.protocol == "h3"
    peers = {s.peer for s in gw.seen if s.protocol == "h3"}
    assert len(peers) == 2  # the server saw the same connection from two addresses
    assert gw.seen[0].conn == gw.seen[-1].conn


async def test_migrate_without_a_connection_is_a_no_op(tmp_path):
    async with running(tmp_path) as gw:
        async with mobile.Client(f"https://127.0.0.1:{gw.https_port}", **client_kwargs(gw, tmp_path)) as c:
            assert not await c.network_changed()


async def test_sync_client(tmp_path):
    async with running(tmp_path) as gw:
        def use() -> tuple:
            # The fake gateway runs on this test's loop, so the blocking client runs in a thread.
            with mobile.SyncClient(f"https://127.0.0.1:{gw.https_port}", **client_kwargs(gw, tmp_path)) as c:
                whole = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                with c.completions.create(model="m", prompt="x", stream=True) as stream:
                    chunks = [ch.text for ch in stream]
                emb = c.embeddings.create(model="e", input=["a"])
                models = c.models.list()
            return whole, chunks, emb, models

        whole, chunks, emb, models = await asyncio.to_thread(use)
    assert whole.text == "hello" and chunks == ["hel", "lo"]
    assert emb.data[0].embedding == [0.5, 0.25] and models.data[0].tier == "core"
