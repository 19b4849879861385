"""The engine: one thread that admits requests, prefills their prompts in chunks and decodes the
running batch, one token per sequence per step.

Each step runs at most one prefill chunk (up to `prefill_chunk` prompt tokens over the joining
sequences) and one decode step, so a long prompt never stalls the streams already running. The model
family is hidden behind `model(tokens, start, cache, slots, last_only, lengths)` and
`model.cache_layout()`; requests come in through `submit` and leave through their `on_event` handler,
which is called on the engine thread.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
from dataclasses import dataclass

import torch
from torch import nn

from core.engine.cuda_graphs import DecodeGraphs
from core.engine.kv_cache import PagedKVCache
from core.engine.request import ContextOverflow, GenerationEvent, GenerationRequest
from core.engine.sampler import SamplingParams, sample
from core.engine.scheduler import EventHandler, Scheduler, Sequence
from core.engine.text import TextStream
from core.model.batch import KV_ALIGN
from core.tokenizer import Tokenizer

log = logging.getLogger("meridian.core.engine")


@dataclass
class GenerationResult:
    """A whole completion, gathered from a request's events."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class Engine:
    """Continuous-batching generation over one model on one device."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_seq_len: int = 2048,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        prefill_chunk: int = 256,
        cuda_graphs: bool = True,
    ) -> None:
        """`kv_cache_bytes`: the KV cache's memory budget (default: room for max_batch full-length
        sequences); requests wait in the queue until their blocks fit in it. `cuda_graphs`: on a
        GPU, replay decode steps from captured graphs (core.engine.cuda_graphs)."""
        self.model, self.tokenizer = model, tokenizer
        weight = next(model.parameters())
        self.device = weight.device
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        # A table row has room for a prefill chunk's padding and the read's alignment past the longest sequence.
        layout, table_len = model.cache_layout(), self.max_seq_len + prefill_chunk + KV_ALIGN
        if kv_cache_bytes is None:
            blocks = max_batch * -(-self.max_seq_len // block_size)
            self.cache = PagedKVCache(layout, blocks, block_size, max_batch, table_len, weight.dtype, self.device)
        else:
            self.cache = PagedKVCache.from_budget(layout, kv_cache_bytes, block_size, max_batch, table_len,
                                                  weight.dtype, self.device)
        self.graphs = DecodeGraphs(model, self.cache, max_batch) if cuda_graphs and self.device.type == "cuda" else None
        self.scheduler = Scheduler(max_batch)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meridian-engine", daemon=True)
        self._thread.start()

    # --- public API -------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_event: EventHandler) -> None:
        """Queue `request`; raises ValueError for bad input. Events go to `on_event` (engine thread)."""
        self._validate(request)
        seed = request.seed if request.seed is not None else random.getrandbits(63)
        sampling = SamplingParams(request.temperature, request.top_p, request.top_k, seed)
        seq = Sequence(request, on_event, sampling, TextStream(self.tokenizer, tuple(request.stop)))
        self.scheduler.add(seq)

    def cancel(self, request_id: str) -> bool:
        """Stop a request before its next step; it ends with finish_reason "cancelled"."""
        return self.scheduler.cancel(request_id)

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Blocking convenience: run `request` and gather its events."""
        events: queue.Queue[GenerationEvent] = queue.Queue()
        self.submit(request, events.put)
        text, ids = [], []
        while True:
            event = events.get(timeout=timeout)
            text.append(event.text)
            ids.extend(event.token_ids)
            if event.finished:
                return GenerationResult("".join(text), ids, event.finish_reason, event.prompt_tokens,
                                        event.completion_tokens, event.error)

    def close(self) -> None:
        """Stop the engine thread (requests still running get no further events)."""
        self._closed.set()
        with self.scheduler.lock:
            self.scheduler.wakeup.notify_all()
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        """Requests waiting or running."""
        with self.scheduler.lock:
            return len(self.scheduler.by_id)

    @property
    def free_blocks(self) -> int:
        """KV cache blocks held by no request."""
        return self.cache.free_blocks

    def stats(self) -> dict[str, int]:
        """Queue and cache occupancy, for metrics."""
        s = self.scheduler
        with s.lock:
            counts = dict(waiting=len(s.waiting), prefilling=len(s.prefilling), running=len(s.running))
        return counts | dict(free_blocks=self.cache.free_blocks, total_blocks=self.cache.num_blocks)

    # --- checks -----------------------------------------------------------------------------

    def _validate(self, r: GenerationRequest) -> None:
        if not r.prompt_ids:
            raise ValueError("the prompt is empty")
        if r.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {r.max_tokens}")
        if not 0 <= r.temperature < math.inf:  # NaN too: it would poison the whole batch's sampling
            raise ValueError(f"temperature must be a finite number >= 0, got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {r.top_p}")
        if r.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {r.top_k}")
        if r.seed is not None and not 0 <= r.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits unsigned, got {r.seed}")
        for name, ids in (("prompt", r.prompt_ids), ("prefix_token_ids", r.prefix_token_ids)):
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"{name} holds token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        total = len(r.prompt_ids) + len(r.prefix_token_ids)
        if total >= self.max_seq_len:
            raise ContextOverflow(f"prompt of {total} tokens leaves no room in the context of {self.max_seq_len}")
        if r.fit_context:  # a ceiling the caller did not name: what the context leaves of it
            r.max_tokens = min(r.max_tokens, self.max_seq_len - len(r.prompt_ids))
        if len(r.prompt_ids) + r.max_tokens > self.max_seq_len:
            raise ContextOverflow(f"max_tokens {r.max_tokens} exceeds the context: a prompt of {len(r.prompt_ids)} tokens "
                             f"leaves room for at most {self.max_seq_len - len(r.prompt_ids)} in {self.max_seq_len}")
        blocks = self.cache.blocks_for(len(r.prompt_ids) + r.max_tokens)
        if blocks > self.cache.num_blocks:
            raise ValueError(f"the request needs {blocks} KV cache blocks; the cache has {self.cache.num_blocks}")

    # --- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closed.is_set():
                self.scheduler.wait_for_work(0.05)
                for seq in self.scheduler.take_cancelled():
                    self._end(seq, "cancelled", "")
                while seq := self.scheduler.admit(lambda s: self.cache.can_allocate(s.max_length)):
                    self._step("join", lambda batch: self._join(batch[0]), [seq])
                self._step("prefill", self._prefill, list(self.scheduler.prefilling))
                self._step("decode", self._decode, list(self.scheduler.running))

    def _step(self, name: str, run, batch: list[Sequence]) -> None:
        """Run one batched step; its failure ends the sequences in it, never the engine."""
        if not batch:
            return
        try:
            run(batch)
        except Exception as exc:
            log.exception("%s step failed", name)
            for seq in batch:
                if seq.slot >= 0 or name == "join":  # not ended already within the step
                    self._end(seq, "error", "", error=f"{name} failed: {exc}")

    def _join(self, seq: Sequence) -> None:
        """An admitted request takes its cache blocks and awaits the prefill of its prompt.

        A resumed request's prefix is then replayed through decode steps, token by token as the
        first run computed it, so its cache, and every token after it, are what that run had (a
        prefill of the prefix would round differently)."""
        r = seq.request
        if r.prefix_token_ids:
            ended = self._prefix_ends(r)
            if ended is not None:
                seq.completion.extend(r.prefix_token_ids)  # they count, as in the first run
                self._end(seq, *ended)
                return
            seq.replay.extend(r.prefix_token_ids)
        seq.slot = self.cache.allocate(seq.max_length)
        self.scheduler.start_prefill(seq)

    def _prefix_ends(self, r: GenerationRequest) -> tuple[str, str] | None:
        """(finish reason, last text) when a resumed prefix already ends its request, else None."""
        probe = TextStream(self.tokenizer, tuple(r.stop))
        for token in r.prefix_token_ids:
            probe.push(token)
        if probe.stopped or r.prefix_token_ids[-1] in self._eos(r):
            return "stop", ""
        if len(r.prefix_token_ids) >= r.max_tokens:
            return "length", probe.finish()
        return None

    def _prefill(self, joining: list[Sequence]) -> None:
        """The next chunk of each joining prompt, in order while they fit in `prefill_chunk` tokens,
        in one forward; a sequence whose prompt is complete samples its first token and joins the
        decode batch.

        A prompt's chunks start at multiples of `prefill_chunk` whatever else is prefilling, and each
        row attends at its own length, so a prompt's cache does not depend on its neighbours."""
        rows, budget = [], self.prefill_chunk
        for seq in joining:
            take = min(seq.prompt_tokens - seq.fed, self.prefill_chunk)
            if take > budget:
                break
            rows.append((seq, take))
            budget -= take
        width = max(take for _, take in rows)
        dev = self.device
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (seq, take) in enumerate(rows):
            tokens[i, :take] = torch.tensor(seq.request.prompt_ids[seq.fed : seq.fed + take])
        start = torch.tensor([seq.fed for seq, _ in rows], dtype=torch.long, device=dev)
        slots = torch.tensor([seq.slot for seq, _ in rows], dtype=torch.long, device=dev)
        lengths = torch.tensor([take for _, take in rows], dtype=torch.long, device=dev)
        logits = self.model(tokens.to(dev), start, self.cache, slots, last_only=True, lengths=lengths)[:, -1]
        done = []
        for seq, take in rows:
            seq.fed += take
            done.append(seq.fed == seq.prompt_tokens)
        finished = [seq for (seq, _), d in zip(rows, done) if d]
        if finished:
            picks = self._pick(logits[torch.tensor(done, device=dev)], finished)
            for seq, token in zip(finished, picks):
                self.scheduler.start_decode(seq)
                self._accept(seq, token)

    def _decode(self, batch: list[Sequence]) -> None:
        """One token for every running sequence."""
        tokens = [s.completion[-1] for s in batch]
        positions, slots = [s.length - 1 for s in batch], [s.slot for s in batch]
        if self.graphs is not None:
            logits = self.graphs(tokens, positions, slots)
        else:
            dev = self.device
            logits = self.model(torch.tensor(tokens, device=dev)[:, None], torch.tensor(positions, device=dev),
                                self.cache, torch.tensor(slots, device=dev))[:, -1]
        for seq, token in zip(batch, self._pick(logits, batch)):
            self._accept(seq, token)

    def _pick(self, logits: torch.Tensor, batch: list[Sequence]) -> list[int]:
        """Next token per row of logits [B, V]: greedy rows by one argmax on the device, so only the
        rows that sample travel to the host (a GPU's full logits would cost more than the step)."""
        picks = logits.argmax(-1).tolist()
        sampled = [i for i, seq in enumerate(batch) if not seq.sampling.greedy and not seq.replay]
        if sampled:
            rows = logits[torch.tensor(sampled, device=logits.device)].float().cpu()
            for i, row in zip(sampled, rows):
                picks[i] = sample(row, batch[i].sampling, len(batch[i].completion))
        return picks

    def _eos(self, r: GenerationRequest) -> frozenset[int]:
        return frozenset() if r.ignore_eos else self.tokenizer.eos_token_ids

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, send its text, and end the sequence when it is done. While a
        resumed prefix replays, its next token stands in for the pick, and its text was sent already."""
        r = seq.request
        if seq.replay:
            token = seq.replay.popleft()
            seq.completion.append(token)
            seq.text.push(token)
            return
        seq.completion.append(token)
        seq.unsent.append(token)
        if token in self._eos(r):
            self._end(seq, "stop", seq.text.finish())
            return
        text = seq.text.push(token)
        if seq.text.stopped:
            self._end(seq, "stop", text)
        elif len(seq.completion) >= r.max_tokens or seq.length >= self.max_seq_len:
            self._end(seq, "length", text + seq.text.finish())
        elif text:
            self._emit(seq, GenerationEvent(r.request_id, text, self._take_unsent(seq), seq.prompt_tokens,
                                            len(seq.completion)))

    def _take_unsent(self, seq: Sequence) -> list[int]:
        ids, seq.unsent = seq.unsent, []
        return ids

    def _end(self, seq: Sequence, reason: str, text: str, error: str | None = None) -> None:
        """Free the slot, forget the sequence, and send its final event."""
        if seq.slot >= 0:
            self.cache.release(seq.slot)
            seq.slot = -1
        self.scheduler.finish(seq)
        r = seq.request
        self._emit(seq, GenerationEvent(r.request_id, text, self._take_unsent(seq), seq.prompt_tokens,
                                        len(seq.completion), reason, error))

    def _emit(self, seq: Sequence, event: GenerationEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:  # the receiver's failure ends its request only
            log.exception("event handler failed for %s", seq.request.request_id)
            if not event.finished:
                seq.cancelled = True
