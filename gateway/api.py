"""The public API's request bodies as typed structs, and their validation.

OpenAI-compatible: fields clients commonly send are accepted, unknown fields are ignored (as the
OpenAI API does), and a field of the wrong type or out of range is a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Literal, Union

import msgspec

from gateway.errors import GatewayError, Kind

MAX_STOP = 4
MAX_STOP_CHARS = 256  # each is matched against the text's end at every token, on both tiers


class TextPart(msgspec.Struct, frozen=True):
    type: str
    text: str = ""


class ChatMessage(msgspec.Struct, frozen=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        """The message content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise bad_request(f"content part type {part.type!r} is not supported", "messages")
        return "".join(p.text for p in self.content)


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ResponseFormat(msgspec.Struct, frozen=True):
    type: str = "text"


class SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None
    stream_options: StreamOptions | None = None
    # Accepted so that asking for them is a clear 400, not an answer that silently lacks them.
    logprobs: Union[bool, int, None] = None
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        """The stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check(self) -> None:
        """Range checks msgspec's types cannot express."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request("max_tokens must be at least 1", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad_request("temperature must be between 0 and 2", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise bad_request("top_p must be in (0, 1]", "top_p")
        if self.n != 1:
            raise bad_request("only n=1 is supported", "n")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad_request("seed must be a non-negative 63-bit integer", "seed")
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise bad_request(f"stop takes at most {MAX_STOP} non-empty strings", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise bad_request(f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
        self._refuse_unsupported()

    def _refuse_unsupported(self) -> None:
        if self.logprobs not in (None, False) or self.top_logprobs:
            raise unsupported("logprobs")
        if self.presence_penalty or self.frequency_penalty:
            raise unsupported("presence_penalty" if self.presence_penalty else "frequency_penalty", "send 0")
        if self.logit_bias:
            raise unsupported("logit_bias")


class CompletionRequest(SamplingFields, frozen=True, kw_only=True):
    prompt: Union[str, list[str]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise unsupported("echo")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "send 1")
        if self.suffix:
            raise unsupported("suffix")

    def prompt_text(self) -> str:
        """The single prompt this request carries."""
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise bad_request("prompt must be one string (batches of prompts are not supported)", "prompt")
        return self.prompt[0]


class ChatRequest(SamplingFields, frozen=True, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None  # "auto", "none", "required" or a named function
    response_format: ResponseFormat | None = None

    def check(self) -> None:
        super().check()
        if self.tools and self.tool_choice != "none":
            raise unsupported("tools", 'leave them out, or send tool_choice "none"')
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported("response_format", 'only {"type": "text"}')

    def token_limit(self) -> int | None:
        """`max_completion_tokens` supersedes the older `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        """Messages as the role/content dicts a chat template expects. `developer` is OpenAI's newer
        name for `system` (its SDKs send it for reasoning models); templates know only `system`."""
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    input: Union[str, list[Union[str, int, list[int]]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def texts(self, max_inputs: int) -> list[str]:
        """The inputs as strings; token-id inputs are refused (tokenization belongs to the model)."""
        inputs = [self.input] if isinstance(self.input, str) else self.input
        if not inputs:
            raise bad_request("input must not be empty", "input")
        if not all(isinstance(x, str) for x in inputs):
            raise bad_request("token-id inputs are not supported; send strings", "input")
        if len(inputs) > max_inputs:
            raise bad_request(f"at most {max_inputs} inputs per request", "input")
        if "" in inputs:  # as OpenAI refuses it: an empty string has no text to embed
            raise bad_request(f"input[{inputs.index('')}] is an empty string", "input")
        return list(inputs)  # type: ignore[arg-type]


_AT = re.compile(r" - at `([^`]*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]*)`")


def decode(body: bytes, schema: type[msgspec.Struct]):
    """Parse a JSON body into `schema`, turning every decoding problem into a 400."""
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid request: {exc}", _invalid_param(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"malformed JSON: {exc}", code="invalid_json") from None
    except UnicodeDecodeError as exc:  # msgspec raises it for invalid UTF-8 inside a string
        raise bad_request(f"malformed JSON: a string is not valid UTF-8 ({exc.reason})", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep, in a field the schema skips
        raise bad_request("malformed JSON: nested too deeply", code="invalid_json") from None


def _invalid_param(message: str) -> str | None:
    """The field a msgspec validation message names, as OpenAI's `param`: "Expected `int`, got
    `str` - at `$.n`" -> "n"; "Object missing required field `role` - at `$.messages[0]`" ->
    "messages[0].role"."""
    at = _AT.search(message)
    path = at.group(1).removeprefix("$").removeprefix(".") if at else ""
    missing = _MISSING.match(message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 with the OpenAI error body."""
    return GatewayError(Kind.BAD_REQUEST, message, param=param, code=code)


def unsupported(param: str, hint: str = "leave it out") -> GatewayError:
    """A 400 for a field this server does not implement, when the request asks for it."""
    return bad_request(f"{param} is not supported by this server ({hint})", param, code="unsupported_parameter")
