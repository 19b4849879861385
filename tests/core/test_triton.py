"""A real tritonserver serving the local checkpoint through our python-backend model."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
import pytest_asyncio

from core.checkpoint.synthetic import MODEL_NAME
from core.engine import Engine, GenerationRequest
from core.model.loader import load_model
from core.tokenizer import Tokenizer
from core.triton.repository import CoreModelSpec, write_model_repository
from core.triton.server import TritonServerSpec, tritonserver_command
from deploy.processes import Child

grpcclient = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.grpc import InferInput

pytestmark = pytest.mark.integration
READY_TIMEOUT_S = 120
READY_BUDGET_S = 30


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except Exception:
        return False


@dataclass
class Server:
    grpc: str
    http: str
    metrics: str
    ready_s: float


@pytest.fixture(scope="module")
def server(local_checkpoint, tmp_path_factory):
    """tritonserver on free ports."""
    tmp = tmp_path_factory.mktemp("triton")
    repo = write_model_repository(tmp / "repo", [CoreModelSpec(MODEL_NAME, local_checkpoint, threads=2)])
    http, grpc, metrics = free_ports(3)
    argv, env = tritonserver_command(TritonServerSpec(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                                      backend_dir=tmp / "backends"))
    # As the launcher runs it: in a process group of its own, stopped with the group, so that none
    # of its python stubs (which outlive a Triton killed after its shutdown timeout) is left behind.
    triton = Child("tritonserver", argv, tmp / "tritonserver.log", env=env)
    started = time.monotonic()
    triton.start()
    try:
        base = f"http://127.0.0.1:{http}/v2"
        while not (_ready(f"{base}/health/ready") and _ready(f"{base}/models/{MODEL_NAME}/ready")):
            if not triton.alive() or time.monotonic() - started > READY_TIMEOUT_S:
                pytest.fail(f"tritonserver did not become ready:\n{triton.log_tail(60)}")
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        print(f"tritonserver ready in {ready_s:.1f}s")
        yield Server(f"127.0.0.1:{grpc}", f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics", ready_s)
    finally:
        triton.stop(timeout=20)


@pytest_asyncio.fixture(loop_scope="session")
async def client(server):
    c = grpcclient.InferenceServerClient(server.grpc)
    yield c
    await c.close()


def _input(name: str, values, dtype: str) -> InferInput:
    arr = np.asarray(values)
    inp = InferInput(name, list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return inp


def inputs(prompt: bytes | None = b"Hello, world!", *, max_tokens=16, temperature=0.0, seed=None, stream=False,
           stop=None, messages=None, prefix=None, top_p=None):
    out = [_input("max_tokens", np.array([max_tokens], np.int32), "INT32"),
           _input("temperature", np.array([temperature], np.float32), "FP32"),
           _input("stream", np.array([stream], bool), "BOOL")]
    if prompt is not None:
        out.append(_input("text_input", np.array([prompt], np.object_), "BYTES"))
    if messages is not None:
        out.append(_input("messages", np.array([json.dumps(messages).encode()], np.object_), "BYTES"))
    if seed is not None:
        out.append(_input("seed", np.array([seed], np.uint64), "UINT64"))
    if top_p is not None:
        out.append(_input("top_p", np.array([top_p], np.float32), "FP32"))
    if stop is not None:
        out.append(_input("stop", np.array([s.encode() for s in stop], np.object_), "BYTES"))
    if prefix is not None:
        out.append(_input("prefix_token_ids", np.array(prefix, np.int32), "INT32"))
    return out


async def infer(client, request_inputs) -> list:
    """All responses of one streamed request: decoded dicts, or an error string."""
    async def requests():
        yield {"model_name": MODEL_NAME, "inputs": request_inputs}

    out = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            out.append(str(error))
            continue
        out.append({
            "text": result.as_numpy("text_output")[0].decode(),
            "token_ids": result.as_numpy("token_ids").tolist(),
            "finish_reason": result.as_numpy("finish_reason")[0].decode(),
            "prompt_tokens": int(result.as_numpy("prompt_tokens")[0]),
            "completion_tokens": int(result.as_numpy("completion_tokens")[0]),
        })
    return out


@pytest.fixture(scope="module")
def local_engine(local_checkpoint):
    eng = Engine(load_model(local_checkpoint), Tokenizer(local_checkpoint), max_batch=2, max_seq_len=512)
    yield eng
    eng.close()


async def test_non_streaming_returns_whole_text_and_counts(client, local_checkpoint):
    (only,) = await infer(client, inputs(max_tokens=12))
    assert only["finish_reason"] in ("length", "stop")
    assert only["completion_tokens"] == len(only["token_ids"]) <= 12
    assert only["prompt_tokens"] == len(Tokenizer(local_checkpoint).encode("Hello, world!"))
    assert only["text"]


async def test_streaming_yields_deltas_then_final(client):
    responses = await infer(client, inputs(max_tokens=24, stream=True, temperature=0.8, seed=5))
    assert len(responses) > 2
    assert all(r["finish_reason"] == "" for r in responses[:-1])
    assert responses[-1]["finish_reason"] in ("length", "stop")
    (whole,) = await infer(client, inputs(max_tokens=24, stream=False, temperature=0.8, seed=5))
    assert "".join(r["text"] for r in responses) == whole["text"]
    assert [t for r in responses for t in r["token_ids"]] == whole["token_ids"]


async def test_same_seed_same_text(client):
    a, b, c = [(await infer(client, inputs(max_tokens=20, temperature=1.0, top_p=0.9, seed=s)))[0] for s in (7, 7, 8)]
    assert a["text"] == b["text"] and a["token_ids"] == b["token_ids"]
    assert a["token_ids"] != c["token_ids"]


async def test_greedy_equals_in_process_model(client, local_engine):
    (served,) = await infer(client, inputs(b"Tell me about the sea.", max_tokens=20))
    ids = local_engine.tokenizer.encode("Tell me about the sea.")
    local = local_engine.generate(GenerationRequest("local", ids, max_tokens=20, temperature=0.0))
    assert (served["text"], served["token_ids"]) == (local.text, local.token_ids)


async def test_chat_messages_and_resume(client, local_engine):
    messages = [{"role": "user", "content": "Hi, how are you?"}]
    (full,) = await infer(client, inputs(None, messages=messages, max_tokens=16, temperature=0.9, seed=3))
    assert full["prompt_tokens"] == len(local_engine.tokenizer.encode_chat(messages))
    (rest,) = await infer(client, inputs(None, messages=messages, max_tokens=16, temperature=0.9, seed=3,
                                         prefix=full["token_ids"][:6]))
    assert rest["token_ids"] == full["token_ids"][6:]
    assert full["text"].endswith(rest["text"])


@pytest.mark.parametrize("bad, message", [
    (dict(max_tokens=-1), "max_tokens must be at least 1"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(prompt=b"\xff\xfe broken"), "text_input is not valid UTF-8"),
    (dict(prompt=None), "text_input (or messages) is required"),
    (dict(prompt=None, messages=[{"role": 1}]), "messages must be"),
    (dict(prefix=[10**8]), "outside the vocabulary"),
])
async def test_bad_input_is_a_clear_error_and_server_goes_on(client, bad, message):
    responses = await infer(client, inputs(**bad))
    assert len(responses) == 1 and isinstance(responses[0], str), responses
    assert message in responses[0]
    (ok,) = await infer(client, inputs(max_tokens=3))
    assert ok["completion_tokens"] == 3 or ok["finish_reason"] == "stop"


def test_ready_time(server):
    # About 5 s on the 2-core CI machine for the mini checkpoint: a slower start (weights re-read,
    # kernels compiled at load) is a regression, well before the fixture's own timeout.
    assert server.ready_s < READY_BUDGET_S


def post(url: str, body: dict) -> tuple[int, str]:
    """POST JSON; (status, body text), errors included."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_triton_generate_endpoints(server, client):
    """Triton's own HTTP generate extension: one JSON answer, or server-sent events."""
    base = f"{server.http}/v2/models/{MODEL_NAME}"
    body = {"text_input": "Tell me about the sea.", "max_tokens": 12, "temperature": 0.7, "seed": 4, "top_p": 0.9}
    (grpc,) = await infer(client, inputs(b"Tell me about the sea.", max_tokens=12, temperature=0.7, seed=4, top_p=0.9))
    status, text = await asyncio.to_thread(post, f"{base}/generate", body)
    assert status == 200, text
    whole = json.loads(text)
    assert (whole["text_output"], whole["token_ids"], whole["finish_reason"]) == (
        grpc["text"], grpc["token_ids"], grpc["finish_reason"])
    status, text = await asyncio.to_thread(post, f"{base}/generate_stream", body | {"stream": True, "stop": ["zzz"]})
    assert status == 200, text
    events = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) > 2 and events[-1]["finish_reason"] == "length"
    assert "".join(e["text_output"] for e in events) == grpc["text"]
    status, text = await asyncio.to_thread(post, f"{base}/generate", {"text_input": "Hi", "max_tokens": 99999})
    assert status == 400 and "bad input [context_length_exceeded]: max_tokens 99999 exceeds the context" in text


async def test_fit_context_shortens_max_tokens_to_the_room_left(server):
    """A ceiling (fit_context) runs to the context's end instead of being refused."""
    url = f"{server.http}/v2/models/{MODEL_NAME}/generate"

    def room(words: int, **extra) -> tuple[int, str]:
        status, text = post(url, {"text_input": "sea " * words, "max_tokens": 99999, "temperature": 0.0, **extra})
        found = re.search(r"a prompt of (\d+) tokens", text)
        return (int(found[1]) if found else -1), text

    (short, _), (long, _) = await asyncio.gather(asyncio.to_thread(room, 100), asyncio.to_thread(room, 200))
    per_word = (long - short) / 100
    words = int(100 + (2048 - 6 - short) / per_word)  # a prompt that leaves a handful of tokens
    prompt_tokens, refused = await asyncio.to_thread(room, words)
    assert "context_length_exceeded" in refused and 2048 - 64 < prompt_tokens < 2048
    _, text = await asyncio.to_thread(room, words, fit_context=True)
    answer = json.loads(text)
    assert "error" not in answer, text
    assert answer["finish_reason"] == "length" and len(answer["token_ids"]) == 2048 - prompt_tokens


def gauge(server: Server, name: str) -> int:
    text = urllib.request.urlopen(server.metrics, timeout=5).read().decode()
    return int(float(re.search(rf"^meridian_core_{name}{{[^}}]*}} (\S+)$", text, re.M).group(1)))


async def test_cancelled_grpc_stream_frees_its_kv_blocks(server, client):
    """A client that goes away mid-stream: Triton cancels the request, the engine frees its blocks."""
    total = gauge(server, "total_blocks")
    deadline = time.monotonic() + 10  # earlier tests' requests are gone; the gauges lag by <= 50 ms
    while gauge(server, "free_blocks") != total:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    async def requests():
        yield {"model_name": MODEL_NAME, "inputs": inputs(max_tokens=1500, stream=True, temperature=0.8, seed=1)}

    responses = client.stream_infer(requests())
    got = 0
    async for result, error in responses:
        assert error is None
        got += 1
        if got == 3:
            break
    deadline = time.monotonic() + 10  # the gauges refresh every 50 ms; 1500 tokens take far longer
    while gauge(server, "free_blocks") == total:  # the stream holds blocks for 1500 tokens
        assert time.monotonic() < deadline, "the running stream holds no blocks"
        await asyncio.sleep(0.02)
    responses.cancel()
    deadline = time.monotonic() + 30
    while gauge(server, "free_blocks") != total:
        assert time.monotonic() < deadline, "blocks not freed after the stream was cancelled"
        await asyncio.sleep(0.1)
    assert gauge(server, "running") == 0
    (ok,) = await infer(client, inputs(max_tokens=3))
    assert ok["completion_tokens"] == 3 or ok["finish_reason"] == "stop"


async def test_the_gateway_passes_over_a_core_address_that_refuses_inside_the_zone(server, local_engine):
    # A zone's core name resolving to a server that is gone and to this one: the request is
    # answered here, and the gone one is out until a probe says otherwise.
    from gateway.core_client import CoreUpstream
    from gateway.upstreams import GenerateCall

    (gone,) = free_ports(1)
    port = int(server.grpc.rsplit(":", 1)[1])

    async def name(host, _port):
        return [("127.0.0.1", gone), ("127.0.0.1", port)]

    upstream = CoreUpstream("zone-a", "core-zone-a", 8001, [MODEL_NAME], resolver=name)
    await upstream.replicas.ready()
    live = next(r for r in upstream.replicas.replicas if r.address[1] == port)
    live.outstanding += 1  # looks busier: the first request is sent to the gone address
    try:
        for i in range(3):
            if i == 1:
                live.outstanding -= 1
            call = GenerateCall(model=MODEL_NAME, prompt="Tell me about the sea.", max_tokens=20, temperature=0.0)
            chunks = [c async for c in upstream.generate(call, timeout=60)]
            ids = local_engine.tokenizer.encode("Tell me about the sea.")
            local = local_engine.generate(GenerationRequest("local", ids, max_tokens=20, temperature=0.0))
            assert [t for c in chunks for t in c.token_ids] == local.token_ids
        assert await upstream.health(timeout=5.0)
        await asyncio.sleep(0.2)  # the gone address's probe answers too
        assert {r.address[1]: r.serving for r in upstream.replicas.replicas} == {gone: False, port: True}
        assert upstream.serving_replicas == 1
    finally:
        await upstream.close()
