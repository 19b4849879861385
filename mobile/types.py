"""The public data shapes: OpenAI's response objects as dataclasses, plus where each answer came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """How an answer travelled: protocol, 0-RTT, attempts, and the gateway's x-meridian-* headers."""

    protocol: str  # "h3" | "http/1.1" | "local"
    local: bool = False  # answered by the on-device model, not the gateway
    early_data: bool = False  # the request went out as 0-RTT data
    attempts: int = 1
    zone: str | None = None
    tier: str | None = None
    cache: str | None = None
    status: int = 200
    request_id: str | None = None  # the gateway's x-request-id: what its logs name this request by

    @classmethod
    def from_headers(cls, protocol: str, status: int, headers: dict[str, str], *, early_data: bool,
                     attempts: int) -> ResponseMeta:
        """Meta for a gateway answer."""
        return cls(protocol, False, early_data, attempts, headers.get("x-meridian-zone"),
                   headers.get("x-meridian-tier"), headers.get("x-meridian-cache"), status,
                   headers.get("x-request-id"))


LOCAL = ResponseMeta("local", local=True, tier="local")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def parse(cls, d: dict | None) -> Usage | None:
        """From an API `usage` object."""
        if not d:
            return None
        return cls(int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0)), int(d.get("total_tokens", 0)))


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    id: str
    model: str
    created: int
    choices: list[ChatChoice]
    usage: Usage | None
    meta: ResponseMeta
    object: str = "chat.completion"

    @property
    def text(self) -> str:
        """The first choice's content."""
        return self.choices[0].message.content if self.choices else ""

    @classmethod
    def parse(cls, d: dict, meta: ResponseMeta) -> ChatCompletion:
        """From the API's JSON."""
        choices = [ChatChoice(int(c.get("index", 0)),
                              ChatMessage(c["message"].get("role", "assistant"), c["message"].get("content") or ""),
                              c.get("finish_reason")) for c in d.get("choices", [])]
        return cls(d.get("id", ""), d.get("model", ""), int(d.get("created", 0)), choices, Usage.parse(d.get("usage")), meta)


@dataclass(frozen=True, slots=True)
class ChatDelta:
    role: str | None = None
    content: str | None = None


@dataclass(frozen=True, slots=True)
class ChatChunkChoice:
    index: int
    delta: ChatDelta
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class ChatCompletionChunk:
    id: str
    model: str
    created: int
    choices: list[ChatChunkChoice]
    usage: Usage | None
    meta: ResponseMeta
    object: str = "chat.completion.chunk"

    @property
    def text(self) -> str:
        """The first choice's new content ('' for role-only or usage-only chunks)."""
        return (self.choices[0].delta.content or "") if self.choices else ""

    @classmethod
    def parse(cls, d: dict, meta: ResponseMeta) -> ChatCompletionChunk:
        """From one SSE event's JSON."""
        choices = [ChatChunkChoice(int(c.get("index", 0)),
                                   ChatDelta(c.get("delta", {}).get("role"), c.get("delta", {}).get("content")),
                                   c.get("finish_reason")) for c in d.get("choices", [])]
        return cls(d.get("id", ""), d.get("model", ""), int(d.get("created", 0)), choices, Usage.parse(d.get("usage")), meta)


@dataclass(frozen=True, slots=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Completion:
    """A text completion, whole or one streamed chunk (OpenAI uses one shape for both)."""

    id: str
    model: str
    created: int
    choices: list[CompletionChoice]
    usage: Usage | None
    meta: ResponseMeta
    object: str = "text_completion"

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""

    @classmethod
    def parse(cls, d: dict, meta: ResponseMeta) -> Completion:
        """From the API's JSON (whole or chunk)."""
        choices = [CompletionChoice(int(c.get("index", 0)), c.get("text") or "", c.get("finish_reason"))
                   for c in d.get("choices", [])]
        return cls(d.get("id", ""), d.get("model", ""), int(d.get("created", 0)), choices, Usage.parse(d.get("usage")), meta)


@dataclass(frozen=True, slots=True)
class Embedding:
    index: int
    embedding: list[float]


@dataclass(frozen=True, slots=True)
class EmbeddingList:
    data: list[Embedding]
    model: str
    usage: Usage | None
    meta: ResponseMeta
    object: str = "list"

    @classmethod
    def parse(cls, d: dict, meta: ResponseMeta) -> EmbeddingList:
        """From the API's JSON."""
        data = [Embedding(int(e.get("index", i)), list(e["embedding"])) for i, e in enumerate(d.get("data", []))]
        return cls(data, d.get("model", ""), Usage.parse(d.get("usage")), meta)


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    owned_by: str = ""
    tier: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelList:
    data: list[Model]
    meta: ResponseMeta
    object: str = "list"

    @classmethod
    def parse(cls, d: dict, meta: ResponseMeta) -> ModelList:
        """From the API's JSON."""
        known = {"id", "owned_by", "meridian_tier", "object", "created"}
        models = [Model(m["id"], m.get("owned_by", ""), m.get("meridian_tier"),
                        {k: v for k, v in m.items() if k not in known}) for m in d.get("data", [])]
        return cls(models, meta)
