"""Small-LM generation over an exported decoder: prefill, decode with the KV cache, sample, stop.

No server code here: the edge's Generate RPC and the mobile SDK's offline mode run this same loop.
The model folder is what `edge.lm_export.build_small_lm` writes: `model.onnx` (and optionally
`model.int8.onnx`), whose inputs are `input_ids`, `position_ids` and `past_key_{i}`/`past_value_{i}`
and whose outputs are the last position's `logits` and `present_key_{i}`/`present_value_{i}`;
`tokenizer.json`; and `meta.json` (task "generation").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge.runtime.chat import ChatTemplate, Messages
from edge.runtime.detokenize import TextStream
from edge.runtime.model_dir import META_FILE, TOKENIZER_FILE, weights_file
from edge.runtime.sampling import pick_token, random_seed
from edge.runtime.sessions import cpu_session

DEFAULT_MAX_TOKENS = 16  # what OpenAI's completions API assumes when max_tokens is not given


class ContextOverflow(ValueError):
    """The prompt leaves no room for a completion in the model's context."""


@dataclass(frozen=True)
class LMMeta:
    """What `meta.json` says about an exported decoder."""

    family: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    fingerprint: str
    chat: ChatTemplate = ChatTemplate()  # no template: chat prompts are transcripts
    # Longrope (Phi-3's long-context models): past this many positions the rotary tables change
    # to the long factors, and the cache, rotated by the short ones, is computed again once.
    rope_switch_at: int | None = None

    @classmethod
    def read(cls, model_dir: Path) -> LMMeta:
        """Read and check `meta.json` in `model_dir`."""
        raw = json.loads((model_dir / META_FILE).read_text())
        if raw.get("task") != "generation":
            raise ValueError(f"{model_dir}: task {raw.get('task')!r} is not 'generation'")
        bos = raw.get("bos_token_id")
        chat = raw.get("chat_template") or {}
        return cls(
            family=str(raw["family"]),
            vocab_size=int(raw["vocab_size"]),
            num_layers=int(raw["num_layers"]),
            num_kv_heads=int(raw["num_kv_heads"]),
            head_dim=int(raw["head_dim"]),
            max_context=int(raw["max_context"]),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(int(t) for t in raw["eos_token_ids"]),
            fingerprint=str(raw.get("fingerprint", "")),
            chat=ChatTemplate(chat.get("source"), str(chat.get("bos_token") or ""), str(chat.get("eos_token") or "")),
            rope_switch_at=None if raw.get("rope_switch_at") is None else int(raw["rope_switch_at"]),
        )


@dataclass(frozen=True)
class GenerateParams:
    """How one request generates; temperature 0 means greedy."""

    max_tokens: int = DEFAULT_MAX_TOKENS  # the whole completion's budget, a resumed prefix included
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Tokens another worker already sent: generation continues after them as if sampled here.
    prefix_token_ids: tuple[int, ...] = ()
    # max_tokens is a ceiling: generation ends at the context's end. False: a prompt that leaves
    # less room than max_tokens is refused (ContextOverflow), as OpenAI's API refuses it.
    fit_context: bool = True


@dataclass(frozen=True)
class Chunk:
    """New output of a generation: a text delta, the tokens behind it, and on the last one the reason."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" or "length" on the last chunk, else None
    prompt_tokens: int
    completion_tokens: int  # running total, prefix included


@dataclass
class KVCache:
    """The past keys and values of every layer, [1, kv_heads, length, head_dim] each."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the tokens cached, while a rope switch lies ahead

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return int(self.keys[0].shape[2]) if self.keys else 0


class SmallLM:
    """An ONNX Runtime session over an exported decoder plus its tokenizer; safe to share across threads."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, meta: LMMeta) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.meta = meta
        # Whether encoding adds BOS itself: a chat template's own BOS string is then dropped.
        self._adds_bos = meta.bos_token_id is not None and tokenizer.encode("x").ids[:1] == [meta.bos_token_id]
        self._outputs = ["logits"] + [
            f"present_{kind}_{i}" for i in range(meta.num_layers) for kind in ("key", "value")
        ]

    @classmethod
    def load(cls, model_dir: Path | str, threads: int = 1, *, int8: bool = False) -> SmallLM:
        """Load an exported model folder; `threads` bounds ONNX Runtime's intra-op pool."""
        model_dir = Path(model_dir)
        weights = weights_file(model_dir, int8=int8, export_command="python -m edge.lm_export")
        return cls(cpu_session(weights, threads), read_tokenizer(model_dir), LMMeta.read(model_dir))

    def chat_prompt(self, messages: Messages) -> str:
        """The prompt for chat `messages`: the checkpoint's template, else a transcript (`edge.runtime.chat`).

        A template that writes the BOS string itself loses it here when the tokenizer adds BOS on
        encoding anyway: `encode` then gives the ids transformers' tokenized chat template gives,
        with one BOS, not two."""
        text = self.meta.chat.render(messages)
        bos = self.meta.chat.bos_token
        if bos and text.startswith(bos) and self._adds_bos:
            text = text[len(bos):]
        return text

    # -- the loop ---------------------------------------------------------------------------------

    def stream(self, prompt: str, params: GenerateParams) -> Iterator[Chunk]:
        """Chunks of the completion of `prompt`, each sent once its text is safe to send.

        Settings are checked here, before the first chunk is asked for (ValueError with a message
        for the caller); the iterator then runs one model step per chunk, at most.
        """
        ids = self.encode(prompt)
        self._check(ids, list(params.prefix_token_ids), params)
        return self._loop(ids, params)

    def _loop(self, ids: list[int], params: GenerateParams) -> Iterator[Chunk]:
        """Prefill, then decode token by token until EOS, a stop string or the token budget."""
        prefix = list(params.prefix_token_ids)
        seed = params.seed if params.seed is not None else random_seed()
        text = TextStream(self.tokenizer, params.stop)
        completion: list[int] = []
        eos = set(self.meta.eos_token_ids)
        for token in prefix:  # replay, so held-back text and stops are as in the first run
            text.push(token)
            completion.append(token)
        if prefix and (text.stopped or completion[-1] in eos):
            yield Chunk("", (), "stop", len(ids), len(completion))
            return
        # A resumed request is the same request: the prefix spends its share of max_tokens.
        budget = min(params.max_tokens - len(prefix), self.meta.max_context - len(ids) - len(prefix))
        if budget <= 0:
            yield Chunk("", (), "length", len(ids), len(completion))
            return
        logits, cache = self.forward(ids + prefix, KVCache())
        unsent: list[int] = []
        for new in range(1, budget + 1):
            token = pick_token(logits, params.temperature, params.top_p, seed, len(completion))
            completion.append(token)
            unsent.append(token)
            if token in eos:
                yield Chunk(text.finish(), tuple(unsent), "stop", len(ids), len(completion))
                return
            piece = text.push(token)
            if text.stopped:
                yield Chunk(piece, tuple(unsent), "stop", len(ids), len(completion))
                return
            if new == budget:
                yield Chunk(piece + text.finish(), tuple(unsent), "length", len(ids), len(completion))
                return
            if piece:
                yield Chunk(piece, tuple(unsent), None, len(ids), len(completion))
                unsent = []
            logits, cache = self.forward([token], cache)

    def generate(
        self,
        prompt: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        top_p: float = 1.0,
    ) -> Iterator[str]:
        """The completion of `prompt` as text pieces (the mobile SDK's offline entry point)."""
        params = GenerateParams(max_tokens, temperature, top_p, seed, tuple(stop))
        for chunk in self.stream(prompt, params):
            if chunk.text:
                yield chunk.text

    # -- building blocks ----------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids as the checkpoint's tokenizer makes them (BOS included if it adds one)."""
        return encode_prompt(self.tokenizer, self.meta, prompt)

    def forward(self, ids: Sequence[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run `ids` after the cached positions: the last position's logits [V] and the grown cache."""
        switch = self.meta.rope_switch_at
        if switch is not None and 0 < cache.length <= switch < cache.length + len(ids):
            ids, cache = [*cache.ids, *ids], KVCache()  # as transformers' Phi-3 does at the switch
        start = cache.length
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None, :],
        }
        empty = np.zeros((1, self.meta.num_kv_heads, 0, self.meta.head_dim), np.float32)
        for i in range(self.meta.num_layers):
            feeds[f"past_key_{i}"] = cache.keys[i] if cache.keys else empty
            feeds[f"past_value_{i}"] = cache.values[i] if cache.values else empty
        logits, *present = self.session.run(self._outputs, feeds)
        # The tokens are kept only while a switch lies ahead: then they are run again.
        kept = [*cache.ids, *ids] if switch is not None and start + len(ids) <= switch else []
        return logits[0], KVCache(list(present[0::2]), list(present[1::2]), kept)

    def greedy_ids(self, prompt: str, steps: int) -> list[int]:
        """Up to `steps` greedy tokens after `prompt`, as many as the context holds, ignoring stop
        conditions (for checks and quality)."""
        ids = self.encode(prompt)
        logits, cache = self.forward(ids, KVCache())
        out: list[int] = []
        for _ in range(min(steps, self.meta.max_context - len(ids))):
            out.append(int(np.argmax(logits)))
            logits, cache = self.forward([out[-1]], cache)
        return out

    def next_logits_along(self, ids: Sequence[int], path: Sequence[int]) -> np.ndarray:
        """Logits [len(path), V] predicting each token of `path` after `ids`, reading `path` as given."""
        logits, cache = self.forward(ids, KVCache())
        rows = [logits]
        for token in path[:-1]:
            logits, cache = self.forward([token], cache)
            rows.append(logits)
        return np.stack(rows)

    def _check(self, ids: list[int], prefix: list[int], params: GenerateParams) -> None:
        """Refuse what could only fail inside the loop, with a message for the caller."""
        if not ids:
            raise ValueError("prompt is empty and the model has no BOS token to start from")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if not 0 <= params.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        bad = [t for t in prefix if not 0 <= t < self.meta.vocab_size]
        if bad:
            raise ValueError(f"prefix_token_ids outside the vocabulary [0, {self.meta.vocab_size}): {bad[:5]}")
        if len(ids) + len(prefix) >= self.meta.max_context:
            raise ContextOverflow(
                f"prompt of {len(ids) + len(prefix)} tokens leaves no room in the context of {self.meta.max_context}"
            )
        if not params.fit_context and len(ids) + params.max_tokens > self.meta.max_context:
            raise ContextOverflow(
                f"max_tokens {params.max_tokens} exceeds the context: a prompt of {len(ids)} tokens leaves room "
                f"for at most {self.meta.max_context - len(ids)} in {self.meta.max_context}"
            )


def read_tokenizer(model_dir: Path) -> Tokenizer:
    """An export's tokenizer as the loop uses it: whole prompts, no padding."""
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode_prompt(tokenizer: Tokenizer, meta: LMMeta, prompt: str) -> list[int]:
    """Prompt token ids as the checkpoint's tokenizer makes them (BOS included if it adds one)."""
    ids = tokenizer.encode(prompt).ids
    if not ids and meta.bos_token_id is not None:
        ids = [meta.bos_token_id]  # an empty prompt still needs one position to start from
    return ids


def load(model_dir: Path | str, threads: int = 1, *, int8: bool = False) -> SmallLM:
    """Load an exported small LM (the entry point the mobile SDK looks for)."""
    return SmallLM.load(model_dir, threads, int8=int8)
