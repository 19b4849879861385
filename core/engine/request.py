"""What goes into the engine (GenerationRequest) and what comes out (GenerationEvent)."""

from __future__ import annotations

from dataclasses import dataclass, field


class ContextOverflow(ValueError):
    """The prompt, or the prompt and max_tokens, does not fit in the model's context."""


@dataclass
class GenerationRequest:
    """One completion to generate from `prompt_ids`.

    `prefix_token_ids`: completion tokens already produced elsewhere (a stream resumed in another
    zone). Generation continues after them as if they had been sampled here: same seed, same text;
    they count toward max_tokens and completion_tokens, and their text is not sent again.
    """

    request_id: str
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prefix_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # max_tokens is a ceiling: shortened to the room the prompt leaves in the context, not refused.
    fit_context: bool = False


@dataclass
class GenerationEvent:
    """New output of one request: a text delta and the tokens behind it, and on the last event the
    finish reason ("stop", "length", "cancelled" or "error", with `error` set)."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
