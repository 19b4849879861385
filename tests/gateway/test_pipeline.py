"""The gateway pipeline with plain values: no sockets, in-process upstreams."""

from __future__ import annotations

import base64
import logging
import re

import msgspec
import numpy as np
import pytest

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.config import parse_topology
from gateway.http import Request
from gateway.upstreams import UpstreamPool
from tests.support.fakes import FakeUpstream

KEY = "sk-test"


TOPOLOGY = {
    "gateway": {"region": "west", "max_body_bytes": 2048},
    "regions": [
        {"name": "west", "lat": 53.3, "lon": -6.3, "cidrs": ["10.1.0.0/16"]},
        {"name": "east", "lat": 50.1, "lon": 8.7, "cidrs": ["10.2.0.0/16"]},
    ],
    "zones": [
        {"name": "zone-a", "region": "west", "address": "127.0.1.1", "edge": {}, "core": {}},
        {"name": "zone-b", "region": "east", "address": "127.0.2.1", "edge": {}, "core": {}},
    ],
    "models": [
        {"name": "embed", "tier": "edge", "kind": "embedding"},
        {"name": "llm", "tier": "core", "kind": "generate"},
    ],
    "auth": {"api_keys": [
        {"name": "k", "tenant": "t1", "sha256": hash_key(KEY)},
        {"name": "old", "tenant": "t1", "sha256": hash_key("sk-revoked"), "revoked": True},
        {"name": "narrow", "tenant": "t2", "sha256": hash_key("sk-narrow"), "models": ["embed"]},
    ]},
}


async def make_gateway(upstreams) -> Gateway:
    pool = UpstreamPool(upstreams)
    await pool.check_once()
    return Gateway(parse_topology(TOPOLOGY), pool)


def req(method: str, path: str, body=None, *, key: str | None = KEY, ip: str = "10.1.0.5", headers=None) -> Request:
    h = {"content-type": "application/json", **(headers or {})}
    if key:
        h["authorization"] = f"Bearer {key}"
    raw = body if isinstance(body, bytes) else (msgspec.json.encode(body) if body is not None else b"")
    return Request(method, path, h, raw, ip, "http/1.1")


def error_of(response) -> dict:
    return msgspec.json.decode(response.body)["error"]


@pytest.fixture
def zones():
    return [FakeUpstream("zone-a", "edge"), FakeUpstream("zone-a", "core"),
            FakeUpstream("zone-b", "edge"), FakeUpstream("zone-b", "core")]


async def test_health_needs_no_key_and_readiness_follows_zones(zones):
    gw = await make_gateway(zones)
    assert (await gw.handle(req("GET", "/healthz", key=None))).status == 200
    assert (await gw.handle(req("GET", "/readyz", key=None))).status == 200
    zones[3].fail = True
    await gw.pool.check_once()
    r = await gw.handle(req("GET", "/readyz", key=None))
    assert r.status == 503
    assert msgspec.json.decode(r.body)["zones"]["zone-b"] == {"edge": True, "core": False}


async def test_readiness_fails_once_draining(zones):
    gw = await make_gateway(zones)
    assert (await gw.handle(req("GET", "/readyz", key=None))).status == 200
    gw.begin_drain()
    r = await gw.handle(req("GET", "/readyz", key=None))
    assert r.status == 503 and msgspec.json.decode(r.body)["status"] == "draining"
    assert (await gw.handle(req("GET", "/healthz", key=None))).status == 200  # still alive


async def test_metrics_show_each_endpoint_s_health_and_serving_replicas(zones):
    gw = await make_gateway(zones)
    zones[2].fail = True
    zones[0].serving_replicas = 3
    zones[0].replica_moves, zones[0].replica_ejections = 7, 2
    await gw.pool.check_once()
    text = (await gw.handle(req("GET", "/metrics", key=None))).body.decode()
    assert 'meridian_upstream_healthy{zone="zone-b",tier="edge"} 0' in text
    assert 'meridian_upstream_healthy{zone="zone-a",tier="edge"} 1' in text
    assert 'meridian_upstream_serving_replicas{zone="zone-a",tier="edge"} 3' in text
    assert "# TYPE meridian_replica_moves_total counter" in text
    assert 'meridian_replica_moves_total{zone="zone-a",tier="edge"} 7' in text
    assert 'meridian_replica_ejections_total{zone="zone-a",tier="edge"} 2' in text


@pytest.mark.parametrize("key,status,code", [(None, 401, "missing_api_key"), ("nope", 401, "invalid_api_key"),
                                             ("sk-revoked", 401, "invalid_api_key")])
async def test_auth_refusals(zones, key, status, code):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}, key=key))
    assert r.status == status
    assert error_of(r)["code"] == code
    assert error_of(r)["type"] == "authentication_error"


async def test_scope_refusal_is_403(zones):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"}, key="sk-narrow"))
    assert r.status == 403
    ok = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}, key="sk-narrow"))
    assert ok.status == 200


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, "malformed JSON"),
    (b"", 400, "empty"),
    (b"\xff\xfe{}", 400, "malformed"),
    (b'{"model": "embed", "input": "\xff\xfe"}', 400, "not valid UTF-8"),  # inside a string: msgspec's UnicodeDecodeError
    ({"model": "embed"}, 400, "input"),
    ({"model": "embed", "input": 5}, 400, "input"),
    ({"model": "embed", "input": []}, 400, "empty"),
    ({"model": "embed", "input": ""}, 400, "input[0] is an empty string"),
    ({"model": "embed", "input": ["a", ""]}, 400, "input[1] is an empty string"),
    ({"model": "embed", "input": [[1, 2]]}, 400, "token-id"),
    ({"model": "nope", "input": "x"}, 404, "does not exist"),
    ({"model": "llm", "input": "x"}, 400, "does not produce embeddings"),
])
async def test_embedding_bad_input(zones, body, status, fragment):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/embeddings", body))
    assert r.status == status, r.body
    assert fragment in error_of(r)["message"]
    assert zones[0].embed_calls == zones[2].embed_calls == 0  # refused before any edge is asked


@pytest.mark.parametrize("path, head", [
    ("/v1/embeddings", b'{"model": "embed", "input": "x", "user_data": '),
    ("/v1/chat/completions", b'{"model": "llm", "messages": [{"role": "user", "content": "x"}], '
                             b'"response_format": {"type": "json_schema", "json_schema": '),
])
async def test_json_nested_past_the_decoder_s_depth_is_a_400_not_a_500(zones, path, head):
    # Where the schema skips a field (unknown, or free-form), msgspec recurses into it and raises
    # RecursionError; 200 kB of brackets fit a real body limit.
    pool = UpstreamPool(zones)
    await pool.check_once()
    gw = Gateway(parse_topology({**TOPOLOGY, "gateway": {"region": "west", "max_body_bytes": 1 << 20}}), pool)
    body = head + b"[" * 100_000 + b"]" * 100_000 + b"}" * (head.count(b"{") - head.count(b"}"))
    r = await gw.handle(req("POST", path, body))
    assert r.status == 400, r.body
    assert error_of(r)["message"] == "malformed JSON: nested too deeply" and error_of(r)["code"] == "invalid_json"


async def test_body_over_limit_is_413(zones):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x" * 4096}))
    assert r.status == 413
    assert error_of(r)["code"] == "request_too_large"


async def test_unknown_route_and_method(zones):
    gw = await make_gateway(zones)
    assert (await gw.handle(req("GET", "/v2/nothing"))).status == 404
    refused = await gw.handle(req("GET", "/v1/embeddings"))
    assert refused.status == 405 and refused.headers["allow"] == "POST"
    refused = await gw.handle(req("POST", "/healthz"))
    assert refused.status == 405 and refused.headers["allow"] == "GET, HEAD"


async def test_embeddings_float_and_base64(zones):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": ["ab", "abcd"]}))
    assert r.status == 200
    assert r.headers["x-meridian-zone"] == "zone-a" and r.headers["x-meridian-tier"] == "edge"
    data = msgspec.json.decode(r.body)
    assert [d["embedding"][0] for d in data["data"]] == [2.0, 4.0]
    assert data["usage"]["prompt_tokens"] == 6
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "abc", "encoding_format": "base64"}))
    vec = np.frombuffer(base64.b64decode(msgspec.json.decode(r.body)["data"][0]["embedding"]), dtype="<f4")
    assert vec.tolist() == [3.0, 0.0, 1.0]


async def test_embedding_dimensions_are_the_model_s_or_refused(zones):
    gw = await make_gateway(zones)
    for bad in (0, -5):
        r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "abc", "dimensions": bad}))
        assert r.status == 400 and error_of(r)["param"] == "dimensions"
    assert zones[0].embed_calls == 0  # refused before any upstream was asked
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "abc", "dimensions": 2}))
    assert r.status == 400 and "has 3 dimensions" in error_of(r)["message"]
    r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "abc", "dimensions": 3}))
    assert r.status == 200


async def test_region_picks_the_nearest_zone(zones):
    gw = await make_gateway(zones)
    body = {"model": "embed", "input": "x"}
    assert (await gw.handle(req("POST", "/v1/embeddings", body, ip="10.2.3.4"))).headers["x-meridian-zone"] == "zone-b"
    assert (await gw.handle(req("POST", "/v1/embeddings", body, ip="10.1.3.4"))).headers["x-meridian-zone"] == "zone-a"
    # The load balancer's header beats the address; an unknown address falls back to the gateway's region.
    hdr = {"x-meridian-region": "east"}
    assert (await gw.handle(req("POST", "/v1/embeddings", body, headers=hdr))).headers["x-meridian-zone"] == "zone-b"
    assert (await gw.handle(req("POST", "/v1/embeddings", body, ip="192.0.2.1"))).headers["x-meridian-zone"] == "zone-a"


async def test_unary_fails_over_to_the_next_zone_and_ejects_after_two_failures(zones):
    gw = await make_gateway(zones)
    zones[0].fail = True  # the health check has not noticed yet
    for _ in range(2):
        r = await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}))
        assert r.status == 200 and r.headers["x-meridian-zone"] == "zone-b"
    assert not gw.pool.endpoints[0].available()
    assert gw.metrics.ejections.get("zone-a", "edge") == 1


async def test_no_healthy_zone_is_503(zones):
    for z in zones:
        z.fail = True
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"}))
    assert r.status == 503
    assert error_of(r)["type"] == "service_unavailable"


async def test_completion_whole(zones):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "hi", "max_tokens": 6, "seed": 7}))
    assert r.status == 200
    data = msgspec.json.decode(r.body)
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "t0 t1 t2 t3 t4 t5 "
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert zones[1].calls[0].seed == 7 and zones[1].calls[0].prompt == "hi"


async def test_chat_stream_resumes_in_the_next_zone(zones):
    zones[1].fail_after = 3
    gw = await make_gateway(zones)
    body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 6,
            "stream_options": {"include_usage": True}}
    r = await gw.handle(req("POST", "/v1/chat/completions", body))
    assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
    events = [e async for e in r.stream]
    assert b": meridian-resumed 1\n\n" in events  # the SSE comment that says the stream moved
    payloads = [e.decode().removeprefix("data: ").strip() for e in events if e.startswith(b"data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [msgspec.json.decode(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "t0 t1 t2 t3 t4 t5 "
    resumed = zones[3].calls[0]
    assert resumed.prefix_token_ids == (0, 1, 2) and resumed.max_tokens == 6
    assert resumed.messages == [{"role": "user", "content": "hi"}]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("body,param", [
    ({"model": "llm", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "llm", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "llm", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "llm", "prompt": "x", "n": 2}, "n"),
    ({"model": "llm", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "llm", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "llm", "prompt": "x", "stop": [1]}, "stop[0]"),
    ({"model": "llm", "prompt": "x", "stop": "s" * 257}, "stop"),
    ({"prompt": "x"}, "model"),
    ({"model": "llm", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "llm", "prompt": "x", "echo": True}, "echo"),
    ({"model": "llm", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "llm", "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"model": "llm", "prompt": "x", "logit_bias": {"50256": -100}}, "logit_bias"),
])
async def test_generation_bad_input(zones, body, param):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/completions", body))
    assert r.status == 400
    if param:
        assert error_of(r)["param"] == param
    assert not zones[1].calls and not zones[3].calls


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


async def test_a_chat_without_a_limit_may_run_to_the_model_s_and_the_context_s_end(zones):
    gw = await make_gateway(zones)
    chat = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}
    assert (await gw.handle(req("POST", "/v1/chat/completions", chat))).status == 200
    assert (await gw.handle(req("POST", "/v1/chat/completions", {**chat, "max_tokens": 5}))).status == 200
    assert (await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"}))).status == 200
    default, named, legacy = zones[1].calls
    assert (default.max_tokens, default.fit_context) == (4096, True)  # the model's max_output_tokens
    assert (named.max_tokens, named.fit_context) == (5, False)  # a limit the client named must fit
    assert (legacy.max_tokens, legacy.fit_context) == (16, False)  # legacy completions: OpenAI's 16


async def test_a_developer_message_reaches_the_template_as_system(zones):
    gw = await make_gateway(zones)
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = await gw.handle(req("POST", "/v1/chat/completions", {"model": "llm", "messages": messages, "max_tokens": 2}))
    assert r.status == 200
    assert zones[1].calls[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("messages,param", [
    ("hi", "messages"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "hi"}, {"role": 3, "content": "x"}], "messages[1].role"),
])
async def test_a_malformed_field_is_named_in_param(zones, messages, param):
    gw = await make_gateway(zones)
    r = await gw.handle(req("POST", "/v1/chat/completions", {"model": "llm", "messages": messages}))
    assert r.status == 400 and error_of(r)["type"] == "invalid_request_error"
    assert error_of(r)["param"] == param
    assert not zones[1].calls and not zones[3].calls


@pytest.mark.parametrize("extra,param", [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "logprobs"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"tools": [TOOL]}, "tools"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
async def test_chat_features_not_served_are_refused(zones, extra, param):
    """Asking for what the server does not do is a 400 naming it, not an answer without it."""
    gw = await make_gateway(zones)
    body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = await gw.handle(req("POST", "/v1/chat/completions", body))
    assert r.status == 400, r.body
    assert error_of(r)["param"] == param and error_of(r)["code"] == "unsupported_parameter"
    assert not zones[1].calls and not zones[3].calls


@pytest.mark.parametrize("extra", [
    {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}},
    {"tools": [TOOL], "tool_choice": "none"},
    {"tools": []},
    {"response_format": {"type": "text"}},
])
async def test_chat_defaults_of_those_features_are_served(zones, extra):
    gw = await make_gateway(zones)
    body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = await gw.handle(req("POST", "/v1/chat/completions", body))
    assert r.status == 200, r.body


async def test_models_list(zones):
    gw = await make_gateway(zones)
    r = await gw.handle(req("GET", "/v1/models"))
    assert [m["id"] for m in msgspec.json.decode(r.body)["data"]] == ["embed", "llm"]
    narrow = await gw.handle(req("GET", "/v1/models", key="sk-narrow"))
    assert [m["id"] for m in msgspec.json.decode(narrow.body)["data"]] == ["embed"]
    assert (await gw.handle(req("GET", "/v1/models/llm"))).status == 200
    assert (await gw.handle(req("GET", "/v1/models/none"))).status == 404


async def test_traceparent_is_carried_upstream(zones):
    gw = await make_gateway(zones)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"}, headers={"traceparent": parent}))
    await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x"}, headers={"traceparent": parent}))
    # Without an SDK installed the trace id and parent are passed on unchanged.
    assert zones[0].traceparent.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert zones[1].calls[0].traceparent.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_every_answer_carries_a_request_id_that_the_access_log_names_too(zones, caplog):
    gw = await make_gateway(zones)
    with caplog.at_level(logging.INFO, logger="meridian.access"):
        answers = [
            await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"})),
            await gw.handle(req("POST", "/v1/embeddings", {"model": "embed", "input": "x"})),  # a cache hit
            await gw.handle(req("GET", "/v1/nope")),
            await gw.handle(req("GET", "/v1/models", key="wrong")),
            await gw.handle(req("POST", "/v1/completions", {"model": "llm", "prompt": "x", "stream": True})),
        ]
    ids = [r.headers["x-request-id"] for r in answers]
    assert [r.status for r in answers] == [200, 200, 404, 401, 200]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)
    logged = [r.request_id for r in caplog.records if r.name == "meridian.access"]
    assert logged == ids
    await answers[-1].stream.aclose()


@pytest.mark.parametrize("given,kept", [
    ("lb-7f3a:1234", True),
    ("a" * 128, True),
    ("a" * 129, False),
    ("two words", False),
    ("evil\r\nset-cookie: x", False),
    ("", False),
])
async def test_a_caller_s_request_id_is_kept_when_it_is_a_plain_token(zones, given, kept):
    gw = await make_gateway(zones)
    r = await gw.handle(req("GET", "/v1/models", headers={"x-request-id": given}))
    assert r.status == 200
    assert (r.headers["x-request-id"] == given) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
