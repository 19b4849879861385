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
from datetime import datetime

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

    def check(self) -> None:
        """Compile the template now (the export does, so that a broken one fails the build, not
        every chat request); ValueError naming the problem."""
        if self.source is None:
            return
        import jinja2

        try:
            _compiled(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template does not compile: {exc.message} (line {exc.lineno})") from None


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
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text with it
        for training masks; rendering keeps the body (in its own scope, as transformers' CallBlock)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # transformers' own environment: trim_blocks, lstrip_blocks, loop controls, generation blocks, its
    # tojson (no HTML escaping) and its globals (Llama 3's templates date the system turn with strftime_now).
    # The core's twin is core/tokenizer.py's compile_chat_template: edge and core may not import each other.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
