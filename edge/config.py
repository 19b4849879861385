"""The edge worker's configuration: loaded once (from the command line) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class EdgeConfig:
    """Everything one edge worker process needs to know."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (see `port_file`)
    zone: str = "local"
    models: dict[str, Path] = field(default_factory=dict)  # served model name -> exported model folder
    threads: int = 1  # ONNX Runtime intra-op threads per session
    # Inference threads, off the event loop; each runs its own session of every embedding model (a copy
    # of the weights each: ~90 MB for all-MiniLM-L6-v2 in fp32).
    workers: int = 1
    max_batch_inputs: int = 256  # inputs in one Embed request
    max_batch: int = 32  # dynamic batching: inputs run together in one model call (1: one request at a time)
    # How long a queue shorter than the last batch may wait for company while a thread is free (see
    # edge/batcher.py). 0 by default: on a 2-core CPU worker waiting never paid (all-MiniLM-L6-v2, one
    # thread, two runs: 181-186 vs 195-197 embeddings/s at concurrency 64 with 2 ms vs 0, 181-187 vs
    # 189-190 at 32, level at 1 and 8): merging a whole wave into one batch stops the event loop's
    # work overlapping the model's.
    max_queue_delay_ms: float = 0.0
    l1_cache_entries: int = 4096  # edge-local cache of embeddings by (model, input); 0 turns it off
    int8: bool = False  # serve the int8 weights of every model (exports carry both)
    max_prompt_chars: int = 32_768  # characters in one Generate prompt
    max_input_chars: int = 32_768  # characters in one input (the model reads 256 tokens anyway)
    drain_timeout_s: float = 15.0  # how long SIGTERM waits for in-flight requests
    # After SIGTERM the worker reports NOT_SERVING but keeps answering for this long, so that health
    # checkers (the gateway probes every 250 ms) move traffic away before any request is refused.
    drain_grace_s: float = 1.5
    log_level: str = "warning"
    port_file: Path | None = None  # written with the bound port once SERVING, for launchers using port 0

    def __post_init__(self) -> None:
        """Refuse settings that could only fail later, with a message naming the setting."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.models:
            raise ValueError("at least one model is required (NAME=DIR)")
        for name in self.models:
            if not name or "=" in name:
                raise ValueError(f"invalid model name {name!r}")
        for setting in ("threads", "workers", "max_batch_inputs", "max_input_chars", "max_batch", "max_prompt_chars"):
            if getattr(self, setting) < 1:
                raise ValueError(f"{setting} must be at least 1, got {getattr(self, setting)}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.l1_cache_entries < 0:
            raise ValueError(f"l1_cache_entries must be >= 0, got {self.l1_cache_entries}")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
