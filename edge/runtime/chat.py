"""Chat messages as one prompt: the checkpoint's chat template when it ships one, else a transcript.

A template is rendered the way transformers' `apply_chat_template(..., add_generation_prompt=True)`
renders it (a sandboxed jinja2 environment, the tokenizer's bos and eos strings), so the edge's
Generate RPC and the mobile SDK's offline mode give the model the prompt transformers would. A
checkpoint without a template (the generated `edge-small` among them) gets one `role: content`
line per message and a last `assistant:` line, the SDK's convention for small LMs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Messages = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template (None: it has none) and the special tokens it may write."""

    source: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Messages) -> str:
        """The prompt text for `messages`, ready for the assistant's turn; ValueError if they are
        malformed or the template refuses them."""
        _check(messages)
        if self.source is None:
            return transcript(messages)
        import jinja2  # only for checkpoints that ship a template

        try:
            return _compiled(self.source).render(
                messages=[dict(m) for m in messages], add_generation_prompt=True,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template refused these messages: {exc}") from None


def transcript(messages: Messages) -> str:
    """`role: content` lines and a last `assistant:` line."""
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


def _check(messages: Messages) -> None:
    if not messages:
        raise ValueError("messages is empty: send at least one")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not m["role"] or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] needs a non-empty string 'role' and a string 'content'")


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    # transformers' own environment: trim_blocks, lstrip_blocks, loop controls, its tojson.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
