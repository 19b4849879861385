"""The matmul attention of decode steps, and the row-by-row attention of prefills, against torch's
SDPA on the masks the model builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.model.batch import Batch, kv_length
from core.model.layers import PV_CHUNK, attention, causal_mask, grouped_attention


def batch_of(start: torch.Tensor, mask: torch.Tensor, spans=None) -> Batch:
    """Only what attention reads: the mask and the prefill spans."""
    return Batch(cache=None, slots=torch.arange(len(start)), start=start, cos=None, sin=None, mask=mask, spans=spans)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("longest", [12, PV_CHUNK + 40])  # the second reduces probs @ v in chunks
def test_grouped_attention_matches_sdpa(heads, kv_heads, t, window, longest):
    g = torch.Generator().manual_seed(0)
    start = torch.tensor([0, 7, longest])  # rows at different lengths, one at its first token
    kv_len = kv_length(int(start.max()) + t)
    q = torch.randn(3, heads, t, 16, generator=g)
    k = torch.randn(3, kv_heads, kv_len, 16, generator=g)
    v = torch.randn(3, kv_heads, kv_len, 8, generator=g)
    mask = causal_mask(start, t, kv_len, window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(grouped_attention(q, k, v, mask, 0.3), want, rtol=1e-5, atol=1e-6)
    flat = attention(q, k, v, batch_of(start, mask), 0.3)
    torch.testing.assert_close(flat, want.transpose(1, 2).reshape(3, t, heads * 8), rtol=1e-5, atol=1e-6)


def test_prefill_rows_attend_at_their_own_length():
    """Right-padded prefill rows: each real query matches SDPA over its own keys; padding stays zero."""
    g = torch.Generator().manual_seed(1)
    spans = [(0, 9), (20, 3), (5, 30)]  # (cached prefix, real tokens)
    start, t = torch.tensor([s for s, _ in spans]), max(n for _, n in spans)
    kv_len = kv_length(int(start.max()) + t)
    q = torch.randn(3, 4, t, 16, generator=g)
    k, v = torch.randn(3, 2, kv_len, 16, generator=g), torch.randn(3, 2, kv_len, 8, generator=g)
    mask = causal_mask(start, t, kv_len)
    out = attention(q, k, v, batch_of(start, mask, spans), 0.25).view(3, t, 4, 8)
    for row, (s, n) in enumerate(spans):
        want = F.scaled_dot_product_attention(q[row : row + 1, :, :n], k[row : row + 1, :, : s + n],
                                              v[row : row + 1, :, : s + n], attn_mask=mask[row : row + 1, :, :n, : s + n],
                                              scale=0.25, enable_gqa=True)
        torch.testing.assert_close(out[row, :n], want[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
        assert not out[row, n:].any()
