"""Offline answers from an on-device model, run by the same ONNX loop the edge uses.

The SDK needs only `LocalModel.generate`; `EdgeLocalModel` adapts the edge's small-LM runtime
(`edge.runtime.generation`, imported on first use so the SDK installs without onnxruntime: it comes
with the `offline` extra).
"""

from __future__ import annotations

import importlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from mobile.errors import ConfigError, MeridianError, OfflineUnavailable
from mobile.types import (LOCAL, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
                          ChatMessage, Completion, CompletionChoice, Usage)


T = TypeVar("T")


class LocalChunk(Protocol):
    """A piece of local output that knows what it cost (the edge runtime's `Chunk` has this shape)."""

    text: str
    finish_reason: str | None  # set on the last piece only
    prompt_tokens: int
    completion_tokens: int  # running total


LocalPiece = str | LocalChunk


@runtime_checkable
class LocalModel(Protocol):
    """A small LM on the device."""

    name: str

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str]) -> Iterator[LocalPiece]:
        """The completion of `prompt`, ending at max_tokens or a stop string: `LocalChunk`s, or plain
        text pieces (then each piece counts as one token, the best guess without a tokenizer).

        ValueError or RuntimeError mean the model cannot answer this request (say, a prompt longer
        than its context); the client then asks the gateway or raises OfflineUnavailable.
        """
        ...


class EdgeLocalModel:
    """The edge's ONNX small LM (prefill, decode with KV cache, sampling) over a model directory."""

    def __init__(self, model_dir: str | Path, name: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self._impl = None
        self._lock = threading.Lock()  # one ONNX session per model, built once

    def _load(self):
        with self._lock:
            if self._impl is None:
                if not self.model_dir.is_dir():
                    raise OfflineUnavailable(f"no local model at {self.model_dir}")
                try:
                    generation = importlib.import_module("edge.runtime.generation")
                except ImportError as exc:
                    raise OfflineUnavailable(
                        f"offline mode needs the edge runtime (pip install 'meridian-mobile[offline]'): {exc}"
                    ) from None
                # The edge runtime's entry point: load(model_dir) -> SmallLM, whose stream(prompt,
                # GenerateParams) yields Chunks carrying the real finish reason and token counts.
                loader = getattr(generation, "load", None)
                params = getattr(generation, "GenerateParams", None)
                if loader is None or params is None:
                    raise OfflineUnavailable("edge.runtime.generation has no load(model_dir) and GenerateParams")
                self._impl = (loader(self.model_dir), params)
        return self._impl

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """Chat `messages` as the edge renders them for this model."""
        lm, _ = self._load()
        return lm.chat_prompt(messages)

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str]) -> Iterator[LocalChunk]:
        """The edge runtime's Chunks (its settings checks raise ValueError here, before the first)."""
        lm, params = self._load()
        return iter(lm.stream(prompt, params(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                             stop=tuple(stop))))


def refusal_as_offline(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, with the local model's refusals (ValueError, RuntimeError) as OfflineUnavailable:
    the SDK's own error, which sends a preferred-local request to the gateway instead."""
    try:
        return fn(*args)
    except MeridianError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise OfflineUnavailable(f"the local model cannot answer: {exc}") from exc


class LocalTally:
    """What a local generation reports: the runtime's finish reason and token counts when its pieces
    carry them, else one token per text piece."""

    def __init__(self, max_tokens: int) -> None:
        self._max_tokens = max_tokens
        self._pieces = 0
        self._finish: str | None = None
        self._prompt_tokens = 0
        self._completion_tokens: int | None = None

    def add(self, piece: LocalPiece) -> str:
        """Count `piece`; its text."""
        self._pieces += 1
        if isinstance(piece, str):
            return piece
        self._finish = piece.finish_reason or self._finish
        self._prompt_tokens = int(piece.prompt_tokens)
        self._completion_tokens = int(piece.completion_tokens)
        return piece.text

    @property
    def completion_tokens(self) -> int:
        return self._pieces if self._completion_tokens is None else self._completion_tokens

    @property
    def finish_reason(self) -> str:
        """The runtime's reason, else 'length' when the budget was spent."""
        return self._finish or ("length" if self.completion_tokens >= self._max_tokens else "stop")

    @property
    def usage(self) -> Usage:
        return Usage(self._prompt_tokens, self.completion_tokens, self._prompt_tokens + self.completion_tokens)


def chat_prompt(messages: Sequence[dict], model: LocalModel | None = None) -> str:
    """The prompt an on-device model gets for chat `messages`: for the edge's own model, what the
    edge renders (the checkpoint's chat template, else a transcript: `edge.runtime.chat`), so that
    a chat answered offline is the one the gateway's edge would answer; for any other model, a
    plain `role: content` transcript ending in `assistant:`."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise ConfigError("each message needs a 'role' and a string 'content'")
    if isinstance(model, EdgeLocalModel):
        return refusal_as_offline(model.chat_prompt, messages)
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


def stops(stop: str | Sequence[str] | None) -> list[str]:
    """`stop` as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _meta() -> tuple[str, int]:
    return uuid.uuid4().hex[:24], int(time.time())


def whole_completion(model: LocalModel, text: str, tally: LocalTally) -> Completion:
    """A local text completion, marked local."""
    rid, created = _meta()
    return Completion(f"cmpl-local-{rid}", model.name, created, [CompletionChoice(0, text, tally.finish_reason)],
                      tally.usage, LOCAL)


def whole_chat(model: LocalModel, text: str, tally: LocalTally) -> ChatCompletion:
    """A local chat completion, marked local."""
    rid, created = _meta()
    return ChatCompletion(f"chatcmpl-local-{rid}", model.name, created,
                          [ChatChoice(0, ChatMessage("assistant", text), tally.finish_reason)], tally.usage, LOCAL)


def completion_chunk(model: LocalModel, rid: str, created: int, text: str, finish: str | None) -> Completion:
    """One streamed local text chunk."""
    return Completion(f"cmpl-local-{rid}", model.name, created, [CompletionChoice(0, text, finish)], None, LOCAL)


def chat_chunk(model: LocalModel, rid: str, created: int, text: str | None, finish: str | None,
               role: str | None = None) -> ChatCompletionChunk:
    """One streamed local chat chunk."""
    return ChatCompletionChunk(f"chatcmpl-local-{rid}", model.name, created,
                               [ChatChunkChoice(0, ChatDelta(role, text), finish)], None, LOCAL)
