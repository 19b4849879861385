"""Decode steps replayed from CUDA graphs.

At a few sequences a GPU decode step is bound by the hundreds of kernel launches Python issues,
not by the GPU. So the model's launches for one step are captured once per (batch size, key length)
bucket and replayed: a step then costs one graph launch.

A step's rows are padded up to its bucket's batch size with rows on the cache's scratch slot (they
write and read only the scratch block), and every row reads the bucket's key length, masked past
its own. The model's decode path makes no host syncs (kernels.fused_moe aligns inside its GEMMs or
on the device), so it captures as it is; a path that does sync (the reference ops, forced) cannot,
and runs eagerly. Prefills stay eager: their shapes change with every prompt.

With `capture=False` the same padded, bucketed forward runs eagerly: that is how CPU tests hold
it to the plain forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from core.engine.kv_cache import PagedKVCache
from core.model.batch import KV_ALIGN

log = logging.getLogger("meridian.core.engine")

FIRST_KV_BUCKET = 128


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch: padding never more than doubles a small
    batch and adds at most 7 rows to a large one."""
    return sorted({min(n, max_batch) for n in [1, 2, 4, *range(8, max_batch + 8, 8)]})


def length_buckets(capacity: int) -> list[int]:
    """Key lengths read: powers of two from FIRST_KV_BUCKET, then the cache's whole row."""
    out, n = [], FIRST_KV_BUCKET
    while n < capacity:
        out.append(n)
        n *= 2
    return out + [capacity // KV_ALIGN * KV_ALIGN]


def _bucket(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class DecodeGraphs:
    """One decode step of `model` over up to `max_batch` rows, replayed from captured graphs."""

    def __init__(self, model: nn.Module, cache: PagedKVCache, max_batch: int, capture: bool = True) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        self.batch_sizes = batch_buckets(max_batch)
        self.kv_lengths = length_buckets(cache.capacity)
        # token, position and slot of each row, on the device where the graphs read them
        self.inputs = torch.zeros(3, self.batch_sizes[-1], dtype=torch.long, device=cache.table.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Next-token logits [rows, V] of one decode step: each row's last token, its position, its
        slot. The logits are a view of the graph's output, valid until the next call."""
        n = len(tokens)
        rows, kv_len = _bucket(self.batch_sizes, n), _bucket(self.kv_lengths, max(positions) + 1)
        pad = rows - n
        staged = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [self.cache.scratch_slot] * pad])
        self.inputs[:, :rows].copy_(staged)
        if self.capture and (rows, kv_len) not in self._graphs:
            try:
                self._record(rows, kv_len)
            except RuntimeError as exc:  # e.g. a host sync in the model's decode path
                log.warning("decode steps cannot be captured; running them eagerly", extra={"error": str(exc)})
                self.capture = False
        if not self.capture:
            return self._forward(rows, kv_len)[:n]
        graph, logits = self._graphs[(rows, kv_len)]
        graph.replay()
        return logits[:n]

    def _forward(self, rows: int, kv_len: int) -> torch.Tensor:
        tokens, start, slots = self.inputs[:, :rows]
        return self.model(tokens[:, None], start, self.cache, slots, kv_len=kv_len)[:, -1]

    def _record(self, rows: int, kv_len: int) -> None:
        """Capture the step for this bucket. Warm-up runs first (kernels compile, BLAS picks its
        algorithms); they run the staged step itself, which writes the same cache entries again."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(rows, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(rows, kv_len)
        self._graphs[(rows, kv_len)] = (graph, logits)
        log.info("captured a decode graph", extra={"rows": rows, "kv_len": kv_len, "graphs": len(self._graphs)})
