"""The OpenAPI document of the public API, generated from the request structs and the topology."""

from __future__ import annotations

import msgspec

from gateway import api
from gateway.config import Topology

_ERRORS = {
    "400": "Bad input",
    "401": "Missing or invalid credentials",
    "403": "Caller lacks the scope",
    "404": "Unknown model or route",
    "413": "Body too large",
    "429": "Rate limited (see Retry-After)",
    "503": "No healthy zone, or every zone at its limit of requests in flight (see Retry-After)",
    "504": "Upstream timeout",
}


def openapi_document(topology: Topology) -> dict:
    """OpenAPI 3.1 for the routes the gateway serves."""
    structs = [api.EmbeddingRequest, api.CompletionRequest, api.ChatRequest]
    _, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    _constrain(components, topology)
    components["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "code": {"type": ["string", "null"]}, "param": {"type": ["string", "null"]}}}},
    }
    components["Object"] = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Meridian gateway", "version": "1", "description": "OpenAI-compatible inference API."},
        "servers": [{"url": "/"}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/embeddings": {"post": _op("Create embeddings", "EmbeddingRequest")},
            "/v1/completions": {"post": _op("Create a completion", "CompletionRequest", stream=True)},
            "/v1/chat/completions": {"post": _op("Create a chat completion", "ChatRequest", stream=True)},
            "/v1/models": {"get": _op("List models")},
            "/healthz": {"get": {**_op("Liveness"), "security": []}},
            "/readyz": {"get": {**_op("Readiness: every zone healthy"), "security": []}},
        },
    }


def _op(summary: str, body: str | None = None, *, stream: bool = False) -> dict:
    ok = {"application/json": {"schema": {"$ref": "#/components/schemas/Object"}}}
    if stream:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    responses = {"200": {"description": "OK", "content": ok}}
    for status, text in _ERRORS.items():
        responses[status] = {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    op: dict = {"summary": summary, "responses": responses}
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return op


def _constrain(components: dict, topology: Topology) -> None:
    """Publish the limits the gateway enforces, so clients (and fuzzers) see them."""
    names = [m.name for m in topology.models]
    limit = max((m.max_output_tokens for m in topology.models if m.kind == "generate"), default=4096)
    for name, schema in components.items():
        props = schema.get("properties", {})
        if "model" in props and names:
            props["model"]["examples"] = names
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": limit}, {"type": "null"}]}
        if "temperature" in props:
            props["temperature"] = {"type": "number", "minimum": 0, "maximum": 2}
        if "top_p" in props:
            props["top_p"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
