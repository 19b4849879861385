"""The KV cache behind the small interface the models use: `update(layer, slots, start, new)`.

Each request owns a slot between joining and leaving the batch, so continuous batching only hands
the model a different list of slots each step. This dense per-slot store is the simple first
implementation; a paged one can replace it behind the same interface.
"""

from __future__ import annotations

from typing import Protocol

import torch


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
