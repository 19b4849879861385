"""Who runs next: the waiting queue, the sequences being prefilled, the decode batch, and each
sequence's bookkeeping.

Continuous batching: sequences join (take cache blocks, are prefilled chunk by chunk) and leave
(finish, are cancelled, fail) between steps. Admission is first come, first served: the head of the
queue joins when the batch has room and the KV cache holds all the blocks it may need; until then
it, and everything behind it, waits.
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
    fed: int = 0  # how much of the prompt is in the cache
    replay: deque[int] = field(default_factory=deque)  # a resumed prefix still to go through decode steps

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def length(self) -> int:
        """Tokens in the cache once the last sampled token is fed back."""
        return self.prompt_tokens + len(self.completion)

    @property
    def max_length(self) -> int:
        """The most tokens this sequence can ever hold: what its cache blocks are sized for."""
        return self.prompt_tokens + self.request.max_tokens


class Scheduler:
    """Thread-safe queues between submitters and the engine thread."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
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

    def admit(self, fits: Callable[[Sequence], bool]) -> Sequence | None:
        """The head of the queue when it joins now: the batch has room and it `fits` the cache.

        Call `start_prefill` (or `finish`) on it before admitting the next, so it counts as active."""
        with self.lock:
            active = len(self.running) + len(self.prefilling)
            if self.waiting and active < self.max_batch and fits(self.waiting[0]):
                return self.waiting.popleft()
            return None

    def take_cancelled(self) -> list[Sequence]:
        """Sequences that were cancelled, wherever they are, removed from the queues."""
        with self.lock:
            gone = [s for s in (*self.running, *self.prefilling, *self.waiting) if s.cancelled]
            if gone:
                self.running = [s for s in self.running if not s.cancelled]
                self.prefilling = [s for s in self.prefilling if not s.cancelled]
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            return gone

    def start_prefill(self, seq: Sequence) -> None:
        """An admitted sequence, holding its blocks, waits for its prompt to be prefilled."""
        with self.lock:
            self.prefilling.append(seq)

    def start_decode(self, seq: Sequence) -> None:
        """A prefilled sequence joins the decode batch."""
        with self.lock:
            if seq in self.prefilling:
                self.prefilling.remove(seq)
            self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Forget a sequence that left the engine."""
        with self.lock:
            for queue in (self.running, self.prefilling):
                if seq in queue:
                    queue.remove(seq)
            self.by_id.pop(seq.request.request_id, None)

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until something is queued, cancelled, or `timeout` passes."""
        with self.lock:
            if not self.waiting and not self.running and not self.prefilling:
                self.wakeup.wait(timeout)

    @property
    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.running and not self.prefilling
