"""The KV cache behind the small interface the models use: `plan` where a forward's tokens go, once
per forward, then `update(layer, plan, new)` in each layer.

Each request owns a slot between joining and leaving the batch, so continuous batching only hands
the model a different list of slots each step. `PagedKVCache` is what the engine runs: a fixed pool
of blocks sized from a memory budget, each slot a row of block ids. `SlotKVCache` is the dense
reference it is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Layout = list[tuple[tuple[int, ...], ...]]


class KVCache(Protocol):
    """What a model needs from a cache."""

    def plan(self, slots: torch.Tensor, start: torch.Tensor, length: int, kv_len: int) -> Any:
        """Where a forward's `length` new tokens per row go (positions start[b].. of slots[b]) and
        which kv_len >= max(start + length) positions each row reads back; the same for every layer."""
        ...

    def update(self, layer: int, plan: Any, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Store `new` ([B, T, ...] each) as planned; return [B, kv_len, ...] views of every entry
        (rows past their own length hold stale data: mask them)."""
        ...


@dataclass(frozen=True)
class SlotPlan:
    slots: torch.Tensor  # [B]
    positions: torch.Tensor  # [B, T] where the new tokens go
    kv_len: int


@dataclass(frozen=True)
class PagedPlan:
    write: torch.Tensor  # [B * T] pool rows of the new tokens
    read: torch.Tensor  # [B * kv_len] pool rows read back
    rows: int
    kv_len: int


class SlotKVCache:
    """Dense storage [max_slots, max_len, *shape] per layer and entry (e.g. MLA: latent, rope key)."""

    def __init__(
        self,
        layout: list[tuple[tuple[int, ...], ...]],
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_slots, self.max_len = max_slots, max_len
        self.buffers = [
            tuple(torch.zeros(max_slots, max_len, *shape, dtype=dtype, device=device) for shape in entry)
            for entry in layout
        ]
        self._free = list(range(max_slots - 1, -1, -1))

    def allocate(self) -> int:
        """Take a free slot for a new sequence."""
        if not self._free:
            raise RuntimeError("KV cache is full: no free slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        """Give a slot back; its stale contents are masked out for the next owner."""
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        """How many sequences can still join."""
        return len(self._free)

    def plan(self, slots: torch.Tensor, start: torch.Tensor, length: int, kv_len: int) -> SlotPlan:
        """See KVCache.plan."""
        if kv_len > self.max_len:
            raise ValueError(f"a read of {kv_len} tokens exceeds the cache length {self.max_len}")
        return SlotPlan(slots, start[:, None] + torch.arange(length, device=start.device)[None, :], kv_len)

    def update(self, layer: int, plan: SlotPlan, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """See KVCache.update."""
        out = []
        for buf, x in zip(self.buffers[layer], new):
            buf[plan.slots[:, None], plan.positions] = x.to(buf.dtype)
            out.append(buf[plan.slots, : plan.kv_len])
        return tuple(out)


def bytes_per_token(layout: Layout, dtype: torch.dtype) -> int:
    """Cache bytes one token takes over all layers."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) * size for entry in layout for shape in entry)


class PagedKVCache:
    """A pool of fixed-size blocks per layer and entry; a slot's row of the block table lists its blocks.

    A sequence takes all the blocks it can ever need when it joins (prompt plus max_tokens), so a
    running sequence never waits for memory; `can_allocate` is the admission test. Block 0 is a
    scratch block: unassigned table entries point at it, so writes past a row's blocks (the padding
    of a batched prefill) land there and are never read. `max_len` is the width of a table row in
    tokens: a sequence's length plus the longest padding a batch may add.
    """

    def __init__(
        self,
        layout: Layout,
        num_blocks: int,
        block_size: int,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size, self.max_slots, self.max_len = num_blocks, block_size, max_slots, max_len
        self.pools = [
            tuple(torch.zeros(num_blocks + 1, block_size, *shape, dtype=dtype, device=device) for shape in entry)
            for entry in layout
        ]
        # One table row more than there are slots: `scratch_slot`, never handed out, all block 0.
        self.table = torch.zeros(max_slots + 1, math.ceil(max_len / block_size), dtype=torch.long, device=device)
        self._free_blocks = list(range(num_blocks, 0, -1))
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._owned: dict[int, list[int]] = {}

    @classmethod
    def from_budget(
        cls, layout: Layout, budget_bytes: int, block_size: int, max_slots: int, max_len: int,
        dtype: torch.dtype, device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """As many blocks as `budget_bytes` holds (the scratch block included)."""
        per_block = bytes_per_token(layout, dtype) * block_size
        return cls(layout, budget_bytes // per_block - 1, block_size, max_slots, max_len, dtype, device)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return math.ceil(tokens / self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        """Whether a sequence of up to `tokens` tokens can join now."""
        return bool(self._free_slots) and self.blocks_for(tokens) <= len(self._free_blocks)

    def allocate(self, tokens: int) -> int:
        """Take a slot and the blocks for up to `tokens` tokens; returns the slot."""
        if tokens > self.max_len:
            raise ValueError(f"{tokens} tokens exceed the cache length {self.max_len}")
        if not self.can_allocate(tokens):
            raise RuntimeError(f"KV cache is full: {tokens} tokens do not fit")
        slot = self._free_slots.pop()
        blocks = [self._free_blocks.pop() for _ in range(self.blocks_for(tokens))]
        self._owned[slot] = blocks
        self.table[slot].zero_()
        self.table[slot, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return slot

    def release(self, slot: int) -> None:
        """Give back a slot and its blocks; their stale contents are masked out for the next owner."""
        self._free_blocks.extend(reversed(self._owned.pop(slot)))
        self.table[slot].zero_()
        self._free_slots.append(slot)

    @property
    def scratch_slot(self) -> int:
        """A slot no sequence owns: rows that only pad a batch's shape write and read block 0 through it."""
        return self.max_slots

    @property
    def capacity(self) -> int:
        """The longest read a table row allows, in tokens."""
        return self.table.shape[1] * self.block_size

    @property
    def free_slots(self) -> int:
        """How many sequences can still join (memory permitting)."""
        return len(self._free_slots)

    @property
    def free_blocks(self) -> int:
        """Blocks held by no sequence."""
        return len(self._free_blocks)

    def plan(self, slots: torch.Tensor, start: torch.Tensor, length: int, kv_len: int) -> PagedPlan:
        """See KVCache.plan: the pool rows of the new tokens and of the [B, kv_len] read."""
        if kv_len > self.capacity:
            raise ValueError(f"a read of {kv_len} tokens exceeds the cache length {self.max_len}")
        pos = start[:, None] + torch.arange(length, device=start.device)[None, :]
        table = self.table[slots]
        write = table.gather(1, pos // self.block_size) * self.block_size + pos % self.block_size
        seen = torch.arange(kv_len, device=start.device)
        read = table[:, seen // self.block_size] * self.block_size + seen % self.block_size
        return PagedPlan(write.flatten(), read.flatten(), len(slots), kv_len)

    def update(self, layer: int, plan: PagedPlan, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """See KVCache.update."""
        out = []
        for pool, x in zip(self.pools[layer], new):
            rows = pool.view(-1, *pool.shape[2:])  # one row per cached token
            rows.index_copy_(0, plan.write, x.reshape(-1, *x.shape[2:]).to(pool.dtype, copy=False))
            out.append(rows.index_select(0, plan.read).view(plan.rows, plan.kv_len, *pool.shape[2:]))
        return tuple(out)
