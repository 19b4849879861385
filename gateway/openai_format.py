"""The OpenAI response shapes: whole answers and Server-Sent Events chunks, text and chat."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Model
from gateway.upstreams import GenerateChunk


@dataclass(frozen=True, slots=True)
class Meta:
    id: str
    created: int
    model: str


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, chunk: GenerateChunk) -> None:
        """Counts are cumulative in the core's chunks; keep the largest seen."""
        self.prompt_tokens = max(self.prompt_tokens, chunk.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, chunk.completion_tokens)

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def model_card(model: Model) -> dict[str, object]:
    """A /v1/models entry."""
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "meridian", "meridian_tier": model.tier}


class Format:
    """How one endpoint shapes its answers."""

    id_prefix = ""
    object_whole = ""
    object_chunk = ""

    def whole(self, meta: Meta, text: str, finish: str, usage: Usage) -> dict:
        raise NotImplementedError

    def stream_start(self, meta: Meta) -> list[dict]:
        return []

    def stream_delta(self, meta: Meta, text: str, finish: str | None) -> dict:
        raise NotImplementedError

    def stream_usage(self, meta: Meta, usage: Usage) -> dict:
        return {**self._head(meta, self.object_chunk), "choices": [], "usage": usage.as_dict()}

    @staticmethod
    def _head(meta: Meta, obj: str) -> dict:
        return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model}


class CompletionFormat(Format):
    id_prefix = "cmpl"
    object_whole = "text_completion"
    object_chunk = "text_completion"

    def whole(self, meta: Meta, text: str, finish: str, usage: Usage) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._head(meta, self.object_whole), "choices": [choice], "usage": usage.as_dict()}

    def stream_delta(self, meta: Meta, text: str, finish: str | None) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._head(meta, self.object_chunk), "choices": [choice]}


class ChatFormat(Format):
    id_prefix = "chatcmpl"
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def whole(self, meta: Meta, text: str, finish: str, usage: Usage) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        return {**self._head(meta, self.object_whole), "choices": [choice], "usage": usage.as_dict()}

    def stream_start(self, meta: Meta) -> list[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
        return [{**self._head(meta, self.object_chunk), "choices": [choice]}]

    def stream_delta(self, meta: Meta, text: str, finish: str | None) -> dict:
        delta = {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {**self._head(meta, self.object_chunk), "choices": [choice]}
