"""What a fault-injection proxy does to traffic, as a value with pure decisions (no sockets)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Fault:
    """A network condition. The default passes traffic untouched."""

    latency_ms: float = 0.0  # added one way, to every packet or chunk
    jitter_ms: float = 0.0  # uniform +- around the latency
    loss: float = 0.0  # probability a datagram is dropped (UDP only; TCP would retransmit anyway)
    blackhole: bool = False  # nothing passes, nothing is refused: connections just hang
    reset: bool = False  # refuse new TCP connections and reset open ones

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("loss must be between 0 and 1")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("latency and jitter must not be negative")

    def delay_s(self, rng: random.Random) -> float:
        """The one-way delay for the next packet, in seconds."""
        if not self.latency_ms and not self.jitter_ms:
            return 0.0
        return max(0.0, self.latency_ms + rng.uniform(-self.jitter_ms, self.jitter_ms)) / 1000.0

    def drops(self, rng: random.Random) -> bool:
        """Whether the next datagram is lost."""
        return self.blackhole or (self.loss > 0 and rng.random() < self.loss)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Fault:
        """A fault from JSON, refusing unknown fields."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        return cls(**data)
