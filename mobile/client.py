"""`Client`: the OpenAI-like asyncio API over a Transport, with retries, auth refresh and offline answers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from mobile import offline
from mobile.auth import Auth, TokenProvider
from mobile.errors import APIError, ConfigError, OfflineUnavailable, ProtocolError, RequestTimeout, TransportError, api_error
from mobile.h1 import H1Transport
from mobile.h3 import H3Transport
from mobile.http import HttpRequest, HttpResponse, SSEDecoder, Transport, iter_with_timeout
from mobile.offline import LocalModel
from mobile.racing import ProtocolMemory, RacingTransport
from mobile.retry import RetryPolicy, parse_retry_after
from mobile.tickets import TicketStore
from mobile.tls import TlsSettings
from mobile.types import ChatCompletion, ChatCompletionChunk, Completion, EmbeddingList, ModelList, ResponseMeta

T = TypeVar("T")
USER_AGENT = "meridian-mobile/0.1"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """handshake: QUIC or TCP+TLS set-up; request: until the response headers (per attempt);
    read: the longest wait between two body chunks."""

    handshake_s: float = 3.0
    request_s: float = 60.0
    read_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.handshake_s, self.request_s, self.read_s) <= 0:
            raise ConfigError("timeouts must be positive")


class Stream(Generic[T]):
    """A streamed answer: `async for chunk in stream`; `aclose()` (or leaving early) cancels it."""

    def __init__(self, chunks: AsyncIterator[T], meta: ResponseMeta, close: Callable[[], Any]) -> None:
        self._chunks = chunks
        self.meta = meta
        self._close = close

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the stream; the server stops generating."""
        close, self._close = self._close, None
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result

    async def __aenter__(self) -> Stream[T]:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Client:
    """The Meridian SDK (asyncio). `base_url` is the gateway's HTTPS origin, e.g. https://host:8444.

    HTTP/3 goes to the same host on `h3_port` (default: the URL's port), HTTP/1.1 over TLS to the
    URL's port. An `http://` URL means plain HTTP/1.1 only (local development).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, token_provider: TokenProvider | None = None,
                 h3_port: int | None = None, http3: bool = True, http1: bool = True, ca_file: str | None = None,
                 verify: bool = True, ticket_dir: str | Path | None = None, timeouts: Timeouts = Timeouts(),
                 retry: RetryPolicy = RetryPolicy(), local_model: LocalModel | None = None,
                 prefer_local: bool = False, auto_idempotency_key: bool = False, fallback_ttl_s: float = 300.0,
                 race_delay_s: float = 0.25, migration_check_s: float | None = 2.0,
                 transport: Transport | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ConfigError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        if local_model is not None and not isinstance(local_model, LocalModel):
            raise ConfigError("local_model must have a name and a generate(prompt, max_tokens, temperature, seed, stop)")
        if prefer_local and local_model is None:
            raise ConfigError("prefer_local needs a local_model")
        prefix = url.path.rstrip("/")
        self._root = prefix if prefix.endswith("/v1") else prefix + "/v1"
        self._auth = Auth(api_key, token_provider)
        self._timeouts = timeouts
        self._retry = retry
        self._local = local_model
        self._prefer_local = prefer_local
        self._auto_key = auto_idempotency_key
        self.transport = transport or self._transport(url, h3_port, http3, http1, ca_file, verify, ticket_dir,
                                                      fallback_ttl_s, race_delay_s, migration_check_s)
        self.chat = _Chat(self)
        self.completions = _Completions(self)
        self.embeddings = _Embeddings(self)
        self.models = _Models(self)

    def _transport(self, url, h3_port, http3, http1, ca_file, verify, ticket_dir, fallback_ttl_s, race_delay_s,
                   migration_check_s) -> Transport:
        tls = TlsSettings(ca_file, verify)
        secure = url.scheme == "https"
        port = url.port or (443 if secure else 80)
        hs = self._timeouts.handshake_s
        h1 = H1Transport(url.hostname, port, tls=tls, use_tls=secure, handshake_timeout=hs) if http1 else None
        h3 = None
        if http3 and secure:
            tickets = TicketStore(ticket_dir) if ticket_dir is not None else None
            h3 = H3Transport(url.hostname, h3_port or port, tls=tls, tickets=tickets, handshake_timeout=hs,
                             migration_check_s=migration_check_s)
        if h1 is None and h3 is None:
            raise ConfigError("no protocol left: http3 needs an https URL, and http1 is off")
        return RacingTransport(h3, h1, memory=ProtocolMemory(fallback_ttl_s), race_delay_s=race_delay_s)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection."""
        await self.transport.aclose()

    async def network_changed(self) -> bool:
        """Tell the SDK the device changed networks: the HTTP/3 connection migrates to the new path."""
        h3 = getattr(self.transport, "h3", None)
        return await h3.migrate() if h3 is not None else False

    # -- the HTTP exchange --------------------------------------------------------------------

    async def _send(self, method: str, path: str, payload: dict | None, *, idempotency_key: str | None,
                    timeout: float | None) -> tuple[HttpResponse, ResponseMeta]:
        """One API call with retries, backoff and a token refresh after 401; raises on error statuses."""
        body = json.dumps(payload, separators=(",", ":")).encode() if payload is not None else b""
        limit = timeout or self._timeouts.request_s
        attempt, refreshed = 0, False
        while True:
            token = await self._auth.token()
            headers = {"user-agent": USER_AGENT, "accept": "application/json, text/event-stream"}
            if body:
                headers["content-type"] = "application/json"
            if token:
                headers["authorization"] = f"Bearer {token}"
            if idempotency_key:
                headers["idempotency-key"] = idempotency_key
            request = HttpRequest(method, self._root + path, headers, body)
            try:
                try:
                    response = await asyncio.wait_for(self.transport.handle(request), limit)
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"no answer within {limit:g} s", sent=True) from None
                if response.status < 400:
                    meta = ResponseMeta.from_headers(response.protocol, response.status, response.headers,
                                                     early_data=response.early_data, attempts=attempt + 1)
                    return response, meta
                error = await self._error(response)
                if response.status == 401 and not refreshed and await self._auth.refresh(token):
                    refreshed = True  # a fresh token is not a retry: it does not use up an attempt
                    continue
                raise error
            except (TransportError, APIError) as exc:
                delay = self._retry.delay(exc, attempt, replay_safe=request.replay_safe)
                if delay is None:
                    raise
            attempt += 1
            await asyncio.sleep(delay)

    async def _error(self, response: HttpResponse) -> APIError:
        """The APIError for an error response (reads its body)."""
        try:
            raw = await response.aread(self._timeouts.read_s)
        except TransportError:
            raw = b""
        message, type_, code, param = f"HTTP {response.status}", "", None, None
        try:
            err = json.loads(raw)["error"]
            message, type_, code = str(err.get("message", message)), str(err.get("type", "")), err.get("code")
            param = err.get("param")
        except (ValueError, KeyError, TypeError, AttributeError):
            if raw:
                message = raw[:200].decode(errors="replace")
        return api_error(response.status, message, type=type_, code=code, param=param,
                         retry_after=parse_retry_after(response.headers.get("retry-after")),
                         request_id=response.headers.get("x-request-id"))

    async def _json(self, method: str, path: str, payload: dict | None, *, idempotency_key: str | None,
                    timeout: float | None) -> tuple[dict, ResponseMeta]:
        response, meta = await self._send(method, path, payload, idempotency_key=idempotency_key, timeout=timeout)
        raw = await response.aread(self._timeouts.read_s)
        try:
            return json.loads(raw), meta
        except ValueError:
            raise ProtocolError(f"answer is not JSON: {raw[:80]!r}", sent=True) from None

    async def _stream(self, path: str, payload: dict, parse: Callable[[dict, ResponseMeta], T], *,
                      idempotency_key: str | None, timeout: float | None) -> Stream[T]:
        response, meta = await self._send("POST", path, payload, idempotency_key=idempotency_key, timeout=timeout)

        async def chunks() -> AsyncIterator[T]:
            decoder = SSEDecoder()
            done = False
            # The finally also runs on break, an error or the generator being collected: leaving
            # early must stop the server (H3: reset the stream; HTTP/1.1: drop the connection).
            try:
                async for raw in iter_with_timeout(response.stream, self._timeouts.read_s):
                    for data in [] if done else decoder.feed(raw):
                        if data == "[DONE]":
                            done = True  # read on to the body's end, so the connection stays reusable
                            break
                        try:
                            event = json.loads(data)
                        except ValueError:
                            raise ProtocolError(f"bad SSE event: {data[:80]!r}", sent=True) from None
                        if "error" in event:  # the gateway reports a failure after the headers this way
                            err = event["error"]
                            raise api_error(int(err.get("status", 502) or 502), str(err.get("message", "stream failed")),
                                            type=str(err.get("type", "")), code=err.get("code"),
                                            param=err.get("param"), request_id=meta.request_id)
                        yield parse(event, meta)
            finally:
                await response.aclose()

        return Stream(chunks(), meta, response.aclose)

    # -- generation with an offline fallback ---------------------------------------------------

    async def _generate(self, kind: str, path: str, payload: dict, *, stream: bool, idempotency_key: str | None,
                        timeout: float | None, local_prompt: Callable[[], str]):
        """A completion from the gateway, or from the local model when preferred or when offline."""
        if idempotency_key is None and self._auto_key:
            idempotency_key = uuid.uuid4().hex  # the app opted in: completions become replay-safe
        if self._prefer_local:
            try:
                return await self._local_answer(kind, payload, stream, local_prompt())
            except OfflineUnavailable:
                pass
        parse = ChatCompletion.parse if kind == "chat" else Completion.parse
        chunk_parse = ChatCompletionChunk.parse if kind == "chat" else Completion.parse
        try:
            if stream:
                return await self._stream(path, payload, chunk_parse, idempotency_key=idempotency_key, timeout=timeout)
            data, meta = await self._json("POST", path, payload, idempotency_key=idempotency_key, timeout=timeout)
            return parse(data, meta)
        except TransportError as exc:
            if self._local is None or self._prefer_local:
                raise
            try:
                return await self._local_answer(kind, payload, stream, local_prompt())
            except OfflineUnavailable as local_exc:
                raise local_exc from exc

    async def _local_answer(self, kind: str, payload: dict, stream: bool, prompt: str):
        """Run the on-device model (in a thread: ONNX blocks); the answer is marked local."""
        model = self._local
        if model is None:
            raise OfflineUnavailable("no local model configured")
        max_tokens = int(payload.get("max_tokens") or 64)
        temperature = float(payload.get("temperature", 1.0) if payload.get("temperature") is not None else 1.0)
        stop = offline.stops(payload.get("stop"))
        loop = asyncio.get_running_loop()
        end = object()
        tally = offline.LocalTally(max_tokens)
        # Refusals (a prompt too long for its context, ...) come as OfflineUnavailable, from the call
        # or from the first piece, so _generate can ask the gateway instead.
        it = await loop.run_in_executor(None, offline.refusal_as_offline, lambda: iter(
            model.generate(prompt, max_tokens, temperature, payload.get("seed"), stop)))

        async def step() -> object:  # a LocalPiece, or `end`
            return await loop.run_in_executor(None, offline.refusal_as_offline, next, it, end)

        if not stream:
            texts: list[str] = []
            while (piece := await step()) is not end:
                texts.append(tally.add(piece))
            return (offline.whole_chat if kind == "chat" else offline.whole_completion)(model, "".join(texts), tally)

        first = await step()  # before the Stream exists: a refusal is raised here, not mid-iteration
        rid, created = uuid.uuid4().hex[:24], int(time.time())
        make = offline.chat_chunk if kind == "chat" else offline.completion_chunk

        async def chunks():
            if kind == "chat":
                yield offline.chat_chunk(model, rid, created, "", None, role="assistant")
            piece = first
            while piece is not end:
                if text := tally.add(piece):
                    yield make(model, rid, created, text, None)
                piece = await step()
            yield make(model, rid, created, None if kind == "chat" else "", tally.finish_reason)

        gen = chunks()
        return Stream(gen, offline.LOCAL, gen.aclose)


def _body(model: str, extra: dict[str, Any], **fields: Any) -> dict:
    """The JSON body: given fields only (None means 'server default'), then extra_body."""
    if not isinstance(model, str) or not model:
        raise ConfigError("model must be a non-empty string")
    body = {"model": model, **{k: v for k, v in fields.items() if v is not None}}
    body.update(extra or {})
    return body


class _ChatCompletions:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def create(self, *, model: str, messages: Sequence[dict], stream: bool = False,
                     max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                     seed: int | None = None, stop: str | Sequence[str] | None = None,
                     idempotency_key: str | None = None, timeout: float | None = None,
                     extra_body: dict | None = None) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """POST /v1/chat/completions; with stream=True an async iterator of chunks."""
        if not messages:
            raise ConfigError("messages must not be empty")
        payload = _body(model, extra_body, messages=list(messages), stream=stream or None, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        return await self._c._generate("chat", "/chat/completions", payload, stream=stream,
                                       idempotency_key=idempotency_key, timeout=timeout,
                                       local_prompt=lambda: offline.chat_prompt(messages, self._c._local))


class _Chat:
    def __init__(self, client: Client) -> None:
        self.completions = _ChatCompletions(client)


class _Completions:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def create(self, *, model: str, prompt: str, stream: bool = False, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                     stop: str | Sequence[str] | None = None, idempotency_key: str | None = None,
                     timeout: float | None = None, extra_body: dict | None = None) -> Completion | Stream[Completion]:
        """POST /v1/completions; with stream=True an async iterator of chunks."""
        if not isinstance(prompt, str):
            raise ConfigError("prompt must be a string")
        payload = _body(model, extra_body, prompt=prompt, stream=stream or None, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        return await self._c._generate("text", "/completions", payload, stream=stream,
                                       idempotency_key=idempotency_key, timeout=timeout, local_prompt=lambda: prompt)


class _Embeddings:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def create(self, *, model: str, input: str | Sequence[str], idempotency_key: str | None = None,
                     timeout: float | None = None, extra_body: dict | None = None) -> EmbeddingList:
        """POST /v1/embeddings."""
        if not isinstance(input, str) and not (input and all(isinstance(s, str) for s in input)):
            raise ConfigError("input must be a string or a non-empty list of strings")
        payload = _body(model, extra_body, input=input if isinstance(input, str) else list(input))
        data, meta = await self._c._json("POST", "/embeddings", payload, idempotency_key=idempotency_key, timeout=timeout)
        return EmbeddingList.parse(data, meta)


class _Models:
    def __init__(self, client: Client) -> None:
        self._c = client

    async def list(self, *, timeout: float | None = None) -> ModelList:
        """GET /v1/models (replay-safe, so it may travel as 0-RTT data)."""
        data, meta = await self._c._json("GET", "/models", None, idempotency_key=None, timeout=timeout)
        return ModelList.parse(data, meta)
