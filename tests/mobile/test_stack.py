"""The SDK against the real local stack (gateway over HTTP/3 and HTTPS/1.1, edge and core)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import mobile
from deploy.drills.faults import Fault
from deploy.drills.proxy import FaultState, Forward, start_forwards
from tests.mobile.test_offline import TinyModel

pytestmark = pytest.mark.integration

CORE_MODEL = "meridian-moe-mini"
EMBED_MODEL = "all-minilm-l6-v2"


def _client(stack, tmp_path, **kw) -> mobile.Client:
    https_port = kw.pop("https_port", stack.https_port)
    args = dict(api_key=stack.api_key, h3_port=stack.h3_port, ca_file=str(stack.cert), ticket_dir=tmp_path / "tickets",
                migration_check_s=None)
    args.update(kw)
    return mobile.Client(f"https://127.0.0.1:{https_port}", **args)


def _free(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_every_endpoint_over_h3_then_resumed_with_0rtt(stack, tmp_path):
    async with _client(stack, tmp_path) as c:
        models = await c.models.list()
        emb = await c.embeddings.create(model=EMBED_MODEL, input=["hello phone"])
        chat = await c.chat.completions.create(model=CORE_MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)
        stream = await c.completions.create(model=CORE_MODEL, prompt="Once", max_tokens=4, temperature=0, stream=True)
        chunks = [ch async for ch in stream]
        await asyncio.sleep(0.1)
    assert {m.id for m in models.data} >= {CORE_MODEL, EMBED_MODEL} and models.meta.protocol == "h3"
    assert len(emb.data[0].embedding) == 384 and emb.meta.tier == "edge"
    assert chat.choices[0].finish_reason and chat.meta.tier == "core" and chat.usage.completion_tokens > 0
    assert "".join(ch.text for ch in chunks) and stream.meta.protocol == "h3"

    async with _client(stack, tmp_path) as c:  # a later app start: resumes with the stored ticket
        listed = await c.models.list()
        unsafe = await c.completions.create(model=CORE_MODEL, prompt="Once", max_tokens=4, temperature=0)
        await asyncio.sleep(0.1)
    assert listed.meta.early_data, "GET on a resumed connection should go as 0-RTT"
    assert not unsafe.meta.early_data

    async with _client(stack, tmp_path) as c:
        first = await c.completions.create(model=CORE_MODEL, prompt="Once", max_tokens=4, temperature=0)
    assert not first.meta.early_data, "a non-idempotent POST went as 0-RTT"
    assert first.text == unsafe.text  # temperature 0: deterministic

    async with _client(stack, tmp_path, auto_idempotency_key=True) as c:
        keyed = await c.completions.create(model=CORE_MODEL, prompt="Once", max_tokens=4, temperature=0)
    assert keyed.meta.early_data and keyed.text == unsafe.text


async def test_an_api_error_names_its_field_and_the_gateway_s_request_id(stack, tmp_path):
    # What an app reports to its backend's support: which field was wrong, and the id the
    # gateway's logs know the request by (the same id every answer's meta carries).
    async with _client(stack, tmp_path) as c:
        ok = await c.embeddings.create(model=EMBED_MODEL, input=["an id for this one"])
        with pytest.raises(mobile.BadRequestError) as bad:
            await c.chat.completions.create(model=CORE_MODEL, messages=[{"content": "no role"}], max_tokens=4)
    assert ok.meta.request_id and len(ok.meta.request_id) == 32
    assert bad.value.status == 400 and bad.value.param == "messages[0].role"
    assert bad.value.request_id and len(bad.value.request_id) == 32 and bad.value.request_id != ok.meta.request_id


async def test_udp_blocked_uses_https_within_one_handshake_timeout(stack, tmp_path):
    # A UDP port that swallows everything: what a firewall blocking QUIC looks like from the phone.
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    try:
        timeouts = mobile.Timeouts(handshake_s=1.5)
        async with _client(stack, tmp_path, h3_port=sink.getsockname()[1], timeouts=timeouts) as c:
            start = time.perf_counter()
            answer = await c.completions.create(model=CORE_MODEL, prompt="Once", max_tokens=4, temperature=0)
            elapsed = time.perf_counter() - start
    finally:
        sink.close()
    assert answer.meta.protocol == "http/1.1" and answer.text
    assert elapsed < timeouts.handshake_s


async def test_unreachable_gateway_answers_locally(stack, tmp_path):
    # Everything to the gateway goes through a proxy that black-holes it: packets vanish, TCP hangs.
    udp, tcp = _free(socket.SOCK_DGRAM), _free(socket.SOCK_STREAM)
    state = FaultState(Fault(blackhole=True))
    opened = await start_forwards(state, [Forward("udp", ("127.0.0.1", udp), ("127.0.0.1", stack.h3_port)),
                                          Forward("tcp", ("127.0.0.1", tcp), ("127.0.0.1", stack.https_port))])
    try:
        model = TinyModel()
        kw = dict(h3_port=udp, https_port=tcp, local_model=model, timeouts=mobile.Timeouts(handshake_s=0.5),
                  retry=mobile.RetryPolicy(max_attempts=2, base_delay_s=0.05))
        async with _client(stack, tmp_path, **kw) as c:
            answer = await c.completions.create(model=CORE_MODEL, prompt="Once", max_tokens=3)
            state.set(Fault())  # the network is back: the same client reaches the gateway again
            online = await c.completions.create(model=CORE_MODEL, prompt="Once", max_tokens=3, temperature=0)
    finally:
        for item in opened:
            item.close()
    assert answer.meta.local and answer.text == "local answer here"
    assert not online.meta.local and online.meta.tier == "core"
