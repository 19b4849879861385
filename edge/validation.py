"""Checks on requests before any model runs: bad input gets a clear error, never a crash."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from edge.errors import EdgeError, ErrorKind
from edge.runtime.generation import DEFAULT_MAX_TOKENS, GenerateParams

M = TypeVar("M")


class ChatMessageLike(Protocol):
    role: str
    content: str


class GenerateRequestLike(Protocol):
    """The fields of a GenerateRequest that the checks read (the protobuf message satisfies it)."""

    prompt: str
    messages: Sequence[ChatMessageLike]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: Sequence[str]
    prefix_token_ids: Sequence[int]
    fit_context: bool

    def HasField(self, name: str) -> bool: ...


@dataclass(frozen=True)
class EmbedLimits:
    """How much one Embed request may ask for."""

    max_batch_inputs: int
    max_input_chars: int


@dataclass(frozen=True)
class GenerateLimits:
    """How much one Generate request may ask for."""

    max_prompt_chars: int = 32_768
    max_messages: int = 1_024  # a chat's messages, each rendered by the template
    max_stop_strings: int = 8
    max_stop_chars: int = 256


def pick_model(name: str, models: Mapping[str, M]) -> M:
    """The served model called `name`, or an error listing the ones that are served."""
    available = ", ".join(sorted(models)) or "none"
    if not name:
        raise EdgeError(ErrorKind.BAD_INPUT, f"model is required; this worker serves: {available}")
    if name not in models:
        raise EdgeError(ErrorKind.UNKNOWN_MODEL, f"model {name!r} is not served here; available: {available}")
    return models[name]


def check_embed_inputs(inputs: Sequence[object], limits: EmbedLimits) -> list[str]:
    """The inputs as a list of strings, if they are within `limits`."""
    if len(inputs) == 0:
        raise EdgeError(ErrorKind.BAD_INPUT, "inputs is empty: send at least one string to embed")
    if len(inputs) > limits.max_batch_inputs:
        raise EdgeError(
            ErrorKind.BAD_INPUT,
            f"too many inputs: {len(inputs)} in one request, the limit is {limits.max_batch_inputs}; split the batch",
        )
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise EdgeError(ErrorKind.BAD_INPUT, f"inputs[{index}] is a {type(text).__name__}, not a string")
        if len(text) > limits.max_input_chars:
            raise EdgeError(
                ErrorKind.BAD_INPUT,
                f"inputs[{index}] has {len(text)} characters, the limit is {limits.max_input_chars}",
            )
    return list(inputs)  # type: ignore[arg-type]  # every item was checked to be a str above


def check_prompt(
    request: GenerateRequestLike, render_chat: Callable[[list[dict[str, str]]], str], limits: GenerateLimits
) -> str:
    """The text to complete: the request's prompt, or its chat messages as `render_chat` (the
    model's chat template) writes them; one or the other, within `limits`."""
    if request.messages:
        if request.prompt:
            raise EdgeError(ErrorKind.BAD_INPUT, "send a prompt or chat messages, not both")
        if len(request.messages) > limits.max_messages:
            raise EdgeError(ErrorKind.BAD_INPUT, f"{len(request.messages)} messages, the limit is {limits.max_messages}")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        size = sum(len(m["role"]) + len(m["content"]) for m in messages)
        if size > limits.max_prompt_chars:  # before rendering: the template's work grows with it
            raise EdgeError(
                ErrorKind.CONTEXT_OVERFLOW, f"messages have {size} characters, the limit is {limits.max_prompt_chars}"
            )
        try:
            prompt = render_chat(messages)
        except ValueError as exc:
            raise EdgeError(ErrorKind.BAD_INPUT, str(exc)) from None
    else:
        prompt = request.prompt
    if len(prompt) > limits.max_prompt_chars:  # as a prompt past the context: the client sends less
        raise EdgeError(
            ErrorKind.CONTEXT_OVERFLOW, f"prompt has {len(prompt)} characters, the limit is {limits.max_prompt_chars}"
        )
    return prompt


def check_generate(request: GenerateRequestLike, limits: GenerateLimits) -> GenerateParams:
    """Sampling settings of a GenerateRequest, if they are within `limits` and make sense."""
    stop = tuple(request.stop)
    if len(stop) > limits.max_stop_strings:
        raise EdgeError(ErrorKind.BAD_INPUT, f"{len(stop)} stop strings, the limit is {limits.max_stop_strings}")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise EdgeError(ErrorKind.BAD_INPUT, f"a stop string is longer than {limits.max_stop_chars} characters")
    temperature, top_p = float(request.temperature), float(request.top_p)
    if not 0 <= temperature < math.inf:  # also refuses NaN
        raise EdgeError(ErrorKind.BAD_INPUT, f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 <= top_p <= 1:
        raise EdgeError(ErrorKind.BAD_INPUT, f"top_p must be in (0, 1], got {top_p}")
    return GenerateParams(
        # proto3 cannot tell 0 from unset: 0 means "not given", as in OpenAI's API.
        max_tokens=int(request.max_tokens) or DEFAULT_MAX_TOKENS,
        # A limit the caller named must fit (as the core and OpenAI's API hold it); the default need not.
        fit_context=bool(request.fit_context) or not request.max_tokens,
        temperature=temperature,
        top_p=top_p or 1.0,
        seed=int(request.seed) if request.HasField("seed") else None,
        stop=stop,
        prefix_token_ids=tuple(int(t) for t in request.prefix_token_ids),
    )
