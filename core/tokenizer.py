"""A checkpoint's tokenizer: encode/decode, the chat template, eos ids and incremental detokenisation.

Reads tokenizer.json with `tokenizers` and renders the chat template with jinja2 the way
transformers' apply_chat_template does, so the core needs no transformers at serving time.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT = "\ufffd"


def _token_text(value) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts in tokenizer_config.json."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text with it for
    training masks; rendering keeps the body (in its own scope, as transformers' CallBlock)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def compile_chat_template(source: str) -> jinja2.Template:
    """`source` in transformers' own environment: trim_blocks, lstrip_blocks, loop controls,
    generation blocks, its tojson (no HTML escaping) and globals (Llama 3 dates its system turn with
    strftime_now). The edge renders its models' templates the same way (edge/runtime/chat.py; the
    layers may not share code)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one checkpoint directory."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self._template = None
        if template is not None:
            self._template = compile_chat_template(template)
        self.eos_token_ids = frozenset(self._eos_ids(path))
        self.vocab_size = self._tok.get_vocab_size()

    def _eos_ids(self, path: Path) -> set[int]:
        """eos from the tokenizer, generation_config.json and config.json, as transformers' generate."""
        ids = set()
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            ids.add(self._tok.token_to_id(self.eos_token))
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(path / name).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with BOS etc. when the tokenizer's post-processor adds them)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; bytes that do not form whole characters become U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for chat `messages`, as transformers renders it."""
        if self._template is None:
            raise ValueError("this model has no chat template: send a prompt (/v1/completions) instead of messages")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids for chat `messages`; the template writes its own special tokens."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class IncrementalDetokenizer:
    """Text deltas as tokens arrive, never splitting a multi-byte character.

    Decodes a short window of recent tokens and emits only what extends the previous window's text
    and ends in a whole character (the scheme vLLM and TGI use); `flush` emits what remains.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a truncated character decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
