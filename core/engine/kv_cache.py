"""The KV cache behind the small interface the models use: `update(layer, slots, start, new)`.

Each request owns a slot between joining and leaving the batch, so continuous batching only hands
the model a different list of slots each step. `PagedKVCache` is what the engine runs: a fixed pool
of blocks sized from a memory budget, each slot a row of block ids. `SlotKVCache` is the dense
reference it is tested against.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

Layout = list[tuple[tuple[int, ...], ...]]


class KVCache(Protocol):
    """What a model needs from a cache."""

    def update(
        self, layer: int, slots: torch.Tensor, start: torch.Tensor, new: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """Store `new` ([B, T, ...] each) at positions start[b].. of slots[b]; return [B, L, ...] views of
        every entry up to L = max(start + T) (rows past their own length hold stale data: mask them)."""
        ...


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

    def update(
        self, layer: int, slots: torch.Tensor, start: torch.Tensor, new: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """See KVCache.update."""
        length = new[0].shape[1]
        pos = start[:, None] + torch.arange(length, device=start.device)[None, :]
        kv_len = int((start + length).max())
        if kv_len > self.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the cache length {self.max_len}")
        out = []
        for buf, x in zip(self.buffers[layer], new):
            buf[slots[:, None], pos] = x.to(buf.dtype)
            out.append(buf[slots, :kv_len])
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
        self.table = torch.zeros(max_slots, math.ceil(max_len / block_size), dtype=torch.long, device=device)
        self._free_blocks = list(range(num_blocks, 0, -1))
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._owned: dict[int, list[int]] = {}
        self._table_version = 0  # bumped whenever a row of the table changes
        self._plan_key: tuple = ()
        self._plan: tuple[torch.Tensor, torch.Tensor, int] = ()
        self._plan_inputs = torch.empty(0)

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
        self._table_version += 1
        return slot

    def release(self, slot: int) -> None:
        """Give back a slot and its blocks; their stale contents are masked out for the next owner."""
        self._free_blocks.extend(reversed(self._owned.pop(slot)))
        self.table[slot].zero_()
        self._table_version += 1
        self._free_slots.append(slot)

    @property
    def free_slots(self) -> int:
        """How many sequences can still join (memory permitting)."""
        return len(self._free_slots)

    @property
    def free_blocks(self) -> int:
        """Blocks held by no sequence."""
        return len(self._free_blocks)

    def update(
        self, layer: int, slots: torch.Tensor, start: torch.Tensor, new: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """See KVCache.update."""
        write, read, kv_len = self._rows(slots, start, new[0].shape[1])
        out = []
        for pool, x in zip(self.pools[layer], new):
            rows = pool.view(-1, *pool.shape[2:])  # one row per cached token
            rows.index_copy_(0, write, x.reshape(-1, *x.shape[2:]).to(pool.dtype))
            out.append(rows.index_select(0, read).view(len(slots), kv_len, *pool.shape[2:]))
        return tuple(out)

    def _rows(self, slots: torch.Tensor, start: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Pool rows to write the new tokens to and to read the [B, kv_len] view from.

        Every layer of a forward passes the same `slots` and `start`, so the rows are worked out once
        per forward and reused while slots, start, length and the table are unchanged. Compared by
        value, not identity (a caller may reuse its tensors): one compare, one host sync on a GPU,
        where working the rows out needs one too.
        """
        key = (length, self._table_version)
        inputs = torch.cat([slots, start])
        if key == self._plan_key and torch.equal(inputs, self._plan_inputs):
            return self._plan
        pos = start[:, None] + torch.arange(length, device=start.device)[None, :]
        kv_len = int((start + length).max())
        if kv_len > self.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the cache length {self.max_len}")
        table = self.table[slots]
        write = table.gather(1, pos // self.block_size) * self.block_size + pos % self.block_size
        seen = torch.arange(kv_len, device=start.device)
        read = table[:, seen // self.block_size] * self.block_size + seen % self.block_size
        self._plan_key, self._plan = key, (write.flatten(), read.flatten(), kv_len)
        self._plan_inputs = inputs
        return self._plan
