"""Who runs next: the waiting queue, the running batch, and each sequence's bookkeeping.

Continuous batching: sequences join (take a cache slot and are prefilled) and leave (finish, are
cancelled, fail) between decode steps. Admission is first come, first served, up to the free slots.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from core.engine.request import GenerationEvent, GenerationRequest
from core.engine.sampler import SamplingParams
from core.engine.text import TextStream

EventHandler = Callable[[GenerationEvent], None]


@dataclass
class Sequence:
    """A request inside the engine: its tokens so far, cache slot, text stream and handler."""

    request: GenerationRequest
    on_event: EventHandler
    sampling: SamplingParams
    text: TextStream
    slot: int = -1
    completion: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # tokens whose text has not gone out yet
    cancelled: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def length(self) -> int:
        """Tokens in the cache once the last sampled token is fed back."""
        return self.prompt_tokens + len(self.completion)


class Scheduler:
    """Thread-safe queues between submitters and the engine thread."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ids must be unique among live requests."""
        with self.lock:
            rid = seq.request.request_id
            if rid in self.by_id:
                raise ValueError(f"request id {rid!r} is already running")
            self.by_id[rid] = seq
            self.waiting.append(seq)
            self.wakeup.notify()

    def cancel(self, request_id: str) -> bool:
        """Mark a live request cancelled; the engine drops it before its next step."""
        with self.lock:
            seq = self.by_id.get(request_id)
            if seq is None:
                return False
            seq.cancelled = True
            self.wakeup.notify()
            return True

    def admit(self, free_slots: int) -> list[Sequence]:
        """Waiting sequences that may join the batch now (cancelled ones are dropped first)."""
        with self.lock:
            out = []
            while self.waiting and len(self.running) + len(out) < self.max_batch and len(out) < free_slots:
                out.append(self.waiting.popleft())
            return out

    def take_cancelled(self) -> list[Sequence]:
        """Running or waiting sequences that were cancelled, removed from the queues."""
        with self.lock:
            gone = [s for s in self.running if s.cancelled] + [s for s in self.waiting if s.cancelled]
            if gone:
                self.running = [s for s in self.running if not s.cancelled]
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            return gone

    def start(self, seq: Sequence) -> None:
        """A prefilled sequence joins the decode batch."""
        with self.lock:
            self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Forget a sequence that left the engine."""
        with self.lock:
            if seq in self.running:
                self.running.remove(seq)
            self.by_id.pop(seq.request.request_id, None)

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until something is queued, cancelled, or `timeout` passes."""
        with self.lock:
            if not self.waiting and not self.running:
                self.wakeup.wait(timeout)

    @property
    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.running
