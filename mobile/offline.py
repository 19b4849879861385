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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from mobile.errors import ConfigError, OfflineUnavailable
from mobile.types import (LOCAL, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
                          ChatMessage, Completion, CompletionChoice, Usage)


@runtime_checkable
class LocalModel(Protocol):
    """A small LM on the device."""

    name: str

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str]) -> Iterator[str]:
        """The completion of `prompt`, as text chunks, ending at max_tokens or a stop string."""
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
                # The edge runtime's entry point: load(model_dir) -> object with generate(...).
                loader = getattr(generation, "load", None)
                if loader is None:
                    raise OfflineUnavailable("edge.runtime.generation has no load(model_dir)")
                self._impl = loader(self.model_dir)
        return self._impl

    def generate(self, prompt: str, max_tokens: int, temperature: float, seed: int | None,
                 stop: Sequence[str]) -> Iterator[str]:
        """Text chunks from the edge runtime's decoder loop."""
        return iter(self._load().generate(prompt, max_tokens=max_tokens, temperature=temperature,
                                          seed=seed, stop=list(stop)))


def chat_prompt(messages: Sequence[dict]) -> str:
    """A plain chat transcript for a small LM without a chat template."""
    lines = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise ConfigError("each message needs a 'role' and a string 'content'")
        lines.append(f"{m['role']}: {m['content']}")
    lines.append("assistant:")
    return "\n".join(lines)


def stops(stop: str | Sequence[str] | None) -> list[str]:
    """`stop` as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _meta() -> tuple[str, int]:
    return uuid.uuid4().hex[:24], int(time.time())


def whole_completion(model: LocalModel, chunks: list[str], finish: str) -> Completion:
    """A local text completion, marked local."""
    rid, created = _meta()
    return Completion(f"cmpl-local-{rid}", model.name, created, [CompletionChoice(0, "".join(chunks), finish)],
                      Usage(0, len(chunks), len(chunks)), LOCAL)


def whole_chat(model: LocalModel, chunks: list[str], finish: str) -> ChatCompletion:
    """A local chat completion, marked local."""
    rid, created = _meta()
    return ChatCompletion(f"chatcmpl-local-{rid}", model.name, created,
                          [ChatChoice(0, ChatMessage("assistant", "".join(chunks)), finish)],
                          Usage(0, len(chunks), len(chunks)), LOCAL)


def completion_chunk(model: LocalModel, rid: str, created: int, text: str, finish: str | None) -> Completion:
    """One streamed local text chunk."""
    return Completion(f"cmpl-local-{rid}", model.name, created, [CompletionChoice(0, text, finish)], None, LOCAL)


def chat_chunk(model: LocalModel, rid: str, created: int, text: str | None, finish: str | None,
               role: str | None = None) -> ChatCompletionChunk:
    """One streamed local chat chunk."""
    return ChatCompletionChunk(f"chatcmpl-local-{rid}", model.name, created,
                               [ChatChunkChoice(0, ChatDelta(role, text), finish)], None, LOCAL)
