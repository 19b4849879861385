"""What one forward pass tells every layer about its rows: where each row's tokens sit, how many of
them are real, the rotary tables and mask for those positions, and the KV cache to read and write.

A forward either decodes (every row holds T real tokens, usually one) or prefills (rows padded on the
right to the longest, `spans` saying where each starts and how many tokens it really holds). The model works row by row
wherever a row's result could otherwise depend on its neighbours (batch invariance, see
`core.model.layers`), and for that it needs each row's own lengths on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from core.engine.kv_cache import KVCache

# Keys are read from the cache in lengths rounded up to this multiple. On CPU, softmax and q @ k^T
# then round a row's real scores alike whatever padded length its batch has (torch's vector loops
# take lengths below 16 and their tails another way); the masked keys add exact zeros.
KV_ALIGN = 16


def kv_length(longest: int) -> int:
    """The key length read for a batch whose longest row reaches `longest` tokens."""
    return -(-longest // KV_ALIGN) * KV_ALIGN


@dataclass
class Batch:
    """The per-forward context of every decoder layer."""

    cache: KVCache
    slots: torch.Tensor  # [B] cache slot of each row
    start: torch.Tensor  # [B] position of each row's first token
    cos: torch.Tensor  # rotary tables for the rows' positions, shaped for layers.apply_rope
    sin: torch.Tensor
    mask: torch.Tensor  # [B, 1, T, kv_len] bool: which keys each query sees
    spans: list[tuple[int, int]] | None = None  # prefill: (start, real tokens) of each right-padded row
    _plan: Any = field(default=None, init=False, repr=False)

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]

    @property
    def prefill(self) -> bool:
        """Rows of their own lengths: attention runs row by row, at each row's own length."""
        return self.spans is not None

    def update_cache(self, layer: int, new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Store this forward's entries ([B, T, ...] each) for `layer`; every entry up to kv_len back."""
        if self._plan is None:  # where the tokens go is the same for every layer: worked out once
            self._plan = self.cache.plan(self.slots, self.start, new[0].shape[1], self.kv_len)
        return self.cache.update(layer, self._plan, new)

