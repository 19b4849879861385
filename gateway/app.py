"""The request pipeline: route -> auth -> validate -> classify -> pick zone -> forward -> answer.

One direction: each step takes the request and either answers or hands it on. Listeners call
`Gateway.handle`; nothing here knows which protocol carried the request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import numpy as np

from gateway import api, openai_format, tracing
from gateway.auth import Authenticator, Principal, authorize
from gateway.cache import CachedAnswer, L2Cache, Lease, cache_key, cacheable, idempotency_key
from gateway.config import Model, Topology
from gateway.errors import CONTEXT_LENGTH_EXCEEDED, GatewayError, Kind
from gateway.failover import Failover
from gateway.http import REQUEST_ID, ClosingStream, Request, Response, request_id
from gateway.metrics import Metrics
from gateway.openapi import openapi_document
from gateway.ratelimit import RateLimiter
from gateway.redis_link import RedisLink
from gateway.routing import Router
from gateway.upstreams import GenerateCall, GenerateChunk, UpstreamPool

log = logging.getLogger("meridian.gateway")
access_log = logging.getLogger("meridian.access")

MAX_EMBED_INPUTS = 256
MAX_IDEMPOTENCY_KEY = 255
# On a fresh answer: the upstream tries it took (1: the first zone answered; hedges and retries
# count), as Envoy's x-envoy-attempt-count. Drills tell a failover's slow answers from jitter by it.
ATTEMPTS = "x-meridian-attempts"
Handler = Callable[[Request, Principal], Awaitable[Response]]


class Gateway:
    """The whole pipeline behind both listeners."""

    def __init__(
        self, topology: Topology, pool: UpstreamPool, *, redis: RedisLink | None = None, metrics: Metrics | None = None
    ) -> None:
        self.topology = topology
        self.pool = pool
        self.draining = False
        self.metrics = metrics or Metrics()
        self.router = Router(topology, pool)
        self.auth = Authenticator(topology.auth)
        self.cache = L2Cache(redis, topology.cache)
        self.limiter = RateLimiter(redis, topology.limits, self.metrics)
        self.failover = Failover(topology.routing, self.metrics, stream_timeout_s=topology.gateway.request_timeout_s)
        self._public: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/metrics"): self.prometheus,
            ("GET", "/openapi.json"): self.openapi,
        }
        self._openapi = msgspec.json.encode(openapi_document(topology))
        self._private: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/models"): self.list_models,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
        }

    async def handle(self, request: Request) -> Response:
        """Answer one request; every failure becomes an OpenAI-style error answer. Every answer
        carries the request's id (`x-request-id`), which the access log and error logs name too."""
        started = time.perf_counter()
        rid = request_id(request.headers)
        try:
            with tracing.server_span(f"{request.method} {request.path}", request.headers) as span:
                async with asyncio.timeout(self.topology.gateway.request_timeout_s):
                    response = await self._dispatch(request)
                if span.is_recording():
                    span.set_attribute("http.response.status_code", response.status)
                    span.set_attribute("meridian.zone", response.headers.get("x-meridian-zone", ""))
        except TimeoutError:
            response = Response.error(
                GatewayError(Kind.UPSTREAM_TIMEOUT, "the request took too long", code="request_timeout")
            )
        except GatewayError as err:
            response = Response.error(err)
        except Exception:  # noqa: BLE001 - a bug must cost one request, never the process
            log.exception("unhandled error", extra={"path": request.path, "request_id": rid})
            response = Response.error(GatewayError(Kind.INTERNAL, "internal error", code="internal_error"))
        response.headers[REQUEST_ID] = rid
        self._observe(request, response, started)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "protocol": request.protocol,
                    "status": response.status,
                    "zone": response.headers.get("x-meridian-zone"),
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "request_id": rid,
                },
            )
        return response

    def _observe(self, request: Request, response: Response, started: float) -> None:
        known = (request.method, request.path) in self._private or (request.method, request.path) in self._public
        route = request.path if known else "other"
        tier = response.headers.get("x-meridian-tier", "")
        zone = response.headers.get("x-meridian-zone", "")
        self.metrics.requests.inc(route, tier, zone, str(response.status))
        self.metrics.latency.observe(time.perf_counter() - started, route, tier, zone)
        cache = response.headers.get("x-meridian-cache")
        if cache:
            self.metrics.cache.inc(cache)

    async def _dispatch(self, request: Request) -> Response:
        # HEAD is GET without the body (RFC 9110 §9.3.2); the listener leaves the body out.
        method = "GET" if request.method == "HEAD" else request.method
        key = (method, request.path)
        if key in self._public:
            return await self._public[key](request)
        handler = self._private.get(key)
        if handler is None:
            if method == "GET" and request.path.startswith("/v1/models/"):
                handler = self.get_model
            elif allowed := {m for m, path in (*self._private, *self._public) if path == request.path}:
                allowed |= {"HEAD"} if "GET" in allowed else set()
                raise GatewayError(Kind.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.path}",
                                   headers={"allow": ", ".join(sorted(allowed))})  # RFC 9110 §15.5.6
            else:
                raise GatewayError(Kind.NOT_FOUND, f"no route {request.method} {request.path}", code="not_found")
        principal = await self.auth.authenticate(request)
        quota = await self.limiter.admit(principal.tenant)
        if len(request.body) > self.topology.gateway.max_body_bytes:
            raise too_large(self.topology.gateway.max_body_bytes)
        try:
            response = await handler(request, principal)
        except GatewayError as err:  # a refusal past admission says what is left of the limits too
            if quota is not None:
                err.headers.update(quota.headers())
            raise
        if quota is not None:
            response.headers.update(quota.headers())
        return response

    # -- health -------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process answers."""
        return Response.json({"status": "ok"})

    def begin_drain(self) -> None:
        """Shutting down: readiness fails from now on, so the load balancer sends no new traffic."""
        self.draining = True

    async def readyz(self, request: Request) -> Response:
        """Readiness: every zone's upstreams answered their last health check, and not draining."""
        zones: dict[str, dict[str, bool]] = {}
        for e in self.pool.endpoints:
            zones.setdefault(e.zone, {})[e.tier] = e.healthy
        if self.draining:
            return Response.json({"status": "draining", "zones": zones}, 503)
        ready = self.pool.all_healthy()
        return Response.json({"status": "ready" if ready else "not ready", "zones": zones}, 200 if ready else 503)

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document of this API."""
        return Response(200, {"content-type": "application/json"}, self._openapi)

    async def prometheus(self, request: Request) -> Response:
        """Prometheus metrics."""
        for e in self.pool.endpoints:
            self.metrics.upstream_healthy.set(e.zone, e.tier, value=1.0 if e.healthy else 0.0)
            self.metrics.upstream_replicas.set(e.zone, e.tier, value=float(e.upstream.serving_replicas))
            self.metrics.replica_moves.set_total(e.zone, e.tier, value=float(e.upstream.replica_moves))
            self.metrics.replica_ejections.set_total(e.zone, e.tier, value=float(e.upstream.replica_ejections))
        return Response(200, {"content-type": "text/plain; version=0.0.4"}, self.metrics.render())

    # -- models -------------------------------------------------------------------------------

    async def list_models(self, request: Request, principal: Principal) -> Response:
        """The models this caller may use."""
        visible = [m for m in self.topology.models if principal.allows(request.path, m.name)]
        return Response.json({"object": "list", "data": [openai_format.model_card(m) for m in visible]})

    async def get_model(self, request: Request, principal: Principal) -> Response:
        """One model card."""
        name = request.path.removeprefix("/v1/models/")
        model = self._model(name, principal, "/v1/models")
        return Response.json(openai_format.model_card(model))

    def _model(self, name: str | None, principal: Principal, route: str) -> Model:
        if not name:
            raise api.bad_request("model is required", "model")
        model = self.topology.model(name)
        if model is None:
            raise GatewayError(
                Kind.NOT_FOUND, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        authorize(principal, route, name)
        return model

    # -- embeddings ---------------------------------------------------------------------------

    async def embeddings(self, request: Request, principal: Principal) -> Response:
        """POST /v1/embeddings, answered by the nearest healthy edge."""
        body: api.EmbeddingRequest = api.decode(request.body, api.EmbeddingRequest)
        model = self._model(body.model, principal, request.path)
        if model.kind != "embedding":
            raise api.bad_request(f"model {model.name!r} does not produce embeddings", "model")
        texts = body.texts(MAX_EMBED_INPUTS)
        if body.dimensions is not None and body.dimensions < 1:  # refused before any upstream is touched
            raise api.bad_request(f"dimensions must be at least 1, got {body.dimensions}", "dimensions")
        got, cache_state = await self._cache_begin(
            request, principal, model, self.router.version(model), body, True
        )
        if isinstance(got, CachedAnswer):
            return _stored_response(got, cache_state)
        try:
            endpoints = self.router.rank(model.tier, self.router.client_region(request))
            timeout = self.topology.routing.try_timeout_s
            traceparent = tracing.current_traceparent(request.headers.get("traceparent"))
            # Embeddings are idempotent: hedged to the next zone when the first is slow (small ones).
            endpoint, result, tries = await self.failover.unary(
                endpoints,
                lambda e: e.upstream.embed(model.name, texts, timeout=timeout, traceparent=traceparent),
                hedge=sum(map(len, texts)) <= self.topology.routing.hedge_max_chars,
            )
            vectors = np.asarray(result.vectors, dtype="<f4")
            dims = vectors.shape[1] if vectors.ndim == 2 else 0
            if body.dimensions is not None and body.dimensions != dims:
                raise api.bad_request(f"model {model.name!r} has {dims} dimensions", "dimensions")
            # The answer is stored as the bytes sent: a hit costs no re-encoding of the vectors.
            answer = CachedAnswer(
                "embed", endpoint.zone, endpoint.tier, prompt_tokens=result.prompt_tokens,
                body=_embedding_body(body, model, vectors, result.prompt_tokens),
            )
            if got is not None:
                await got.store(answer)
        finally:
            if got is not None:
                await got.release()
        # Counted towards tokens_per_minute as generations are (a cache hit costs the tenant none).
        await self.limiter.debit(principal.tenant, result.prompt_tokens)
        return _stored_response(answer, cache_state, tries)

    async def _cache_begin(
        self, request: Request, principal: Principal, model: Model, version: str, body, deterministic: bool
    ) -> tuple[CachedAnswer | Lease | None, str]:
        """(hit, lease to fill, or None) and the x-meridian-cache value for a produced answer.

        With an `Idempotency-Key` the first answer to that key is replayed ("replay") whatever the
        sampling or the cache settings, and the key may not be reused for a different request."""
        idem = request.headers.get("idempotency-key")
        if idem is not None:
            fingerprint = cache_key(principal.tenant, model.name, version, request.path, body)
            return await self._idempotent_begin(principal.tenant, request.path, idem, fingerprint)
        control = request.headers.get("cache-control", "")
        if not (self.cache.enabled and deterministic) or "no-cache" in control or "no-store" in control:
            return None, "bypass"
        fingerprint = cache_key(principal.tenant, model.name, version, request.path, body)
        got = await self.cache.begin(fingerprint, request=fingerprint)
        if isinstance(got, CachedAnswer):
            return got, "hit"
        return got, "miss" if got is not None else "bypass"

    async def _idempotent_begin(
        self, tenant: str, route: str, idem: str, fingerprint: str
    ) -> tuple[CachedAnswer | Lease | None, str]:
        if not 1 <= len(idem) <= MAX_IDEMPOTENCY_KEY or not idem.isprintable():
            raise api.bad_request(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
        if not self.cache.reachable:
            return None, "bypass"
        got = await self.cache.begin(idempotency_key(tenant, route, idem), request=fingerprint)
        if isinstance(got, CachedAnswer):
            if got.request != fingerprint:
                raise GatewayError(Kind.UNPROCESSABLE, "this Idempotency-Key was used for a different request",
                                   code="idempotency_key_reused")
            return got, "replay"
        return got, "miss" if got is not None else "bypass"

    # -- generation ---------------------------------------------------------------------------

    async def completions(self, request: Request, principal: Principal) -> Response:
        """POST /v1/completions."""
        body: api.CompletionRequest = api.decode(request.body, api.CompletionRequest)
        model = self._generative(body.model, principal, request.path)
        body.check()
        # OpenAI's default for legacy completions.
        call = self._call(request, body, model, prompt=body.prompt_text(), max_tokens=body.max_tokens or 16)
        return await self._generate(request, principal, body, model, call, openai_format.CompletionFormat())

    async def chat_completions(self, request: Request, principal: Principal) -> Response:
        """POST /v1/chat/completions; the serving tier applies the model's chat template."""
        body: api.ChatRequest = api.decode(request.body, api.ChatRequest)
        model = self._generative(body.model, principal, request.path)
        body.check()
        if body.max_completion_tokens is not None and body.max_completion_tokens < 1:
            raise api.bad_request("max_completion_tokens must be at least 1", "max_completion_tokens")
        limit = body.token_limit()
        # OpenAI's chat default is no limit short of the model's: its max_output_tokens, or the end
        # of the context if that comes first (where a limit the client named is refused).
        call = self._call(request, body, model, messages=body.plain_messages(),
                          max_tokens=model.max_output_tokens if limit is None else limit, fit_context=limit is None)
        return await self._generate(request, principal, body, model, call, openai_format.ChatFormat())

    def _generative(self, name: str, principal: Principal, route: str) -> Model:
        model = self._model(name, principal, route)
        if model.kind != "generate":
            raise api.bad_request(f"model {model.name!r} does not generate text", "model")
        return model

    def _call(self, request: Request, body: api.SamplingFields, model: Model, **fields) -> GenerateCall:
        fields.setdefault("max_tokens", body.max_tokens)
        if fields["max_tokens"] is not None and fields["max_tokens"] > model.max_output_tokens:
            raise api.bad_request(
                f"max_tokens {fields['max_tokens']} is over this model's limit of {model.max_output_tokens}", "max_tokens"
            )
        return GenerateCall(
            model=model.name,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=tuple(body.stop_list()),
            stream=body.stream,
            traceparent=tracing.current_traceparent(request.headers.get("traceparent")),
            model_version=self.router.version(model),
            **fields,
        )

    async def _generate(
        self,
        request: Request,
        principal: Principal,
        body: api.SamplingFields,
        model: Model,
        call: GenerateCall,
        fmt: openai_format.Format,
    ) -> Response:
        meta = openai_format.Meta(id=f"{fmt.id_prefix}-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model.name)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        got, cache_state = await self._cache_begin(
            request, principal, model, call.model_version, body, cacheable(body.temperature, body.seed)
        )
        if isinstance(got, CachedAnswer):
            return await _answer(body.stream, fmt, meta, include_usage, _replay(got), got.zone, got.tier, cache_state)
        endpoints = self.router.rank(model.tier, self.router.client_region(request))
        stream = self.failover.stream(endpoints, call)
        try:
            await stream.start()
        except BaseException as exc:
            if got is not None:
                await got.release()
            if isinstance(exc, GatewayError) and exc.code == CONTEXT_LENGTH_EXCEEDED and exc.param is None:
                exc.param = "messages" if isinstance(body, api.ChatRequest) else "prompt"  # as OpenAI names it
            raise
        recording = _Recording(stream.first_zone, model.tier)
        finished = False

        async def finish() -> None:
            # Once, by whichever comes first: the chunks' end, or the listener closing an answer
            # it never began to write.
            nonlocal finished
            if finished:
                return
            finished = True
            await stream.aclose()
            if got is not None:
                await got.release()
            await self.limiter.debit(principal.tenant, recording.total_tokens)

        async def chunks() -> AsyncIterator[GenerateChunk]:
            try:
                async for chunk in stream.chunks():
                    recording.add(chunk)
                    yield chunk
                if got is not None:
                    await got.store(recording.answer())
            finally:
                await finish()

        return await _answer(body.stream, fmt, meta, include_usage, chunks(), stream.first_zone, model.tier, cache_state,
                             resumed=lambda: stream.resumed, on_close=finish, tries=lambda: stream.tries)


class _Recording:
    """What a generation produced, kept to store it in the cache once it finished."""

    def __init__(self, zone: str, tier: str) -> None:
        self.zone, self.tier = zone, tier
        self.deltas: list[str] = []
        self.usage = openai_format.Usage()
        self.finish = "stop"

    def add(self, chunk: GenerateChunk) -> None:
        self.deltas.append(chunk.text)
        self.usage.add(chunk)
        self.finish = chunk.finish_reason or self.finish

    @property
    def total_tokens(self) -> int:
        return self.usage.prompt_tokens + self.usage.completion_tokens

    def answer(self) -> CachedAnswer:
        return CachedAnswer(
            "generate", self.zone, self.tier, self.deltas, self.finish,
            self.usage.prompt_tokens, self.usage.completion_tokens,
        )


async def _replay(answer: CachedAnswer) -> AsyncIterator[GenerateChunk]:
    last = len(answer.deltas) - 1
    for i, text in enumerate(answer.deltas or [""]):
        done = i >= last
        yield GenerateChunk(
            text,
            finish_reason=answer.finish_reason if done else None,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens if done else 0,
        )


async def _nothing() -> None:
    pass


async def _answer(stream: bool, fmt, meta, include_usage: bool, chunks, zone: str, tier: str, cache: str,
                  resumed=lambda: 0, on_close=_nothing, tries=None) -> Response:
    """A streamed answer as SSE (closing it runs `on_close`), or the whole answer gathered from the chunks.
    `tries` (a fresh answer): the upstream tries it took so far, sent as x-meridian-attempts."""
    headers = {"x-meridian-zone": zone, "x-meridian-tier": tier, "x-meridian-cache": cache}
    if stream:
        if tries is not None:  # the tries to open it; resumes after the headers are in the SSE comment
            headers[ATTEMPTS] = str(tries())
        return Response.event_stream(ClosingStream(_sse(chunks, fmt, meta, include_usage, resumed), on_close), headers)
    text: list[str] = []
    usage = openai_format.Usage()
    finish = "stop"
    try:
        async for chunk in chunks:
            text.append(chunk.text)
            usage.add(chunk)
            finish = chunk.finish_reason or finish
    finally:
        await chunks.aclose()
    if tries is not None:
        headers[ATTEMPTS] = str(tries())
    return Response.json(fmt.whole(meta, "".join(text), finish, usage), headers=headers)


async def _sse(
    chunks: AsyncIterator[GenerateChunk], fmt: openai_format.Format, meta: openai_format.Meta, include_usage: bool,
    resumed=lambda: 0,
) -> AsyncIterator[bytes]:
    usage = openai_format.Usage()
    try:
        for event in fmt.stream_start(meta):
            yield _event(event)
        async for chunk in chunks:
            usage.add(chunk)
            yield _event(fmt.stream_delta(meta, chunk.text, chunk.finish_reason))
        if include_usage:
            yield _event(fmt.stream_usage(meta, usage))
        if n := resumed():
            # An SSE comment (clients skip it): the stream moved zones n times on its way.
            yield b": meridian-resumed %d\n\n" % n
        yield b"data: [DONE]\n\n"
    except GatewayError as err:
        # Headers are gone already: the error travels as an SSE event, as OpenAI's API does.
        yield b"data: " + err.body() + b"\n\n"
    finally:
        await chunks.aclose()


def _event(data: object) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


def _embedding_body(body: api.EmbeddingRequest, model: Model, vectors: np.ndarray, tokens: int) -> bytes:
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return msgspec.json.encode({"object": "list", "data": data, "model": model.name, "usage": usage})


def _stored_response(answer: CachedAnswer, cache: str, tries: int | None = None) -> Response:
    headers = {"content-type": "application/json", "x-meridian-zone": answer.zone, "x-meridian-tier": answer.tier,
               "x-meridian-cache": cache}
    if tries is not None:
        headers[ATTEMPTS] = str(tries)
    return Response(200, headers, answer.body)


def _encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode()
    return vector.tolist()


def too_large(limit: int) -> GatewayError:
    """413 for a body over the configured limit."""
    return GatewayError(Kind.TOO_LARGE, f"request body exceeds {limit} bytes", code="request_too_large")


def undecodable_body(encoding: str) -> GatewayError:
    """400 for a body that its Content-Encoding does not decode."""
    return GatewayError(Kind.BAD_REQUEST, f"request body is not valid {encoding[:32] or 'encoded'} data "
                        "(Content-Encoding)", code="invalid_content_encoding")


def body_timeout(seconds: float) -> GatewayError:
    """408 for a client that did not deliver its body in time."""
    return GatewayError(Kind.REQUEST_TIMEOUT, f"request body not received within {seconds:g}s", code="body_timeout")


def header_limit(max_headers: int, max_bytes: int) -> GatewayError:
    """431 for too many or too large headers."""
    return GatewayError(
        Kind.HEADERS_TOO_LARGE, f"at most {max_headers} headers and {max_bytes} bytes of headers", code="headers_too_large"
    )


def too_many_connections(limit: int) -> GatewayError:
    """503 for a connection past the listener's limit of open connections."""
    return GatewayError(
        Kind.OVERLOADED, f"this gateway holds its limit of {limit} connections; retry shortly", code="overloaded",
        headers={"retry-after": "1"},
    )


def too_many_streams(limit: int) -> GatewayError:
    """429 for a connection over its concurrent stream limit."""
    return GatewayError(
        Kind.RATE_LIMITED, f"at most {limit} concurrent requests per connection", code="too_many_streams",
        headers={"retry-after": "1"},
    )
