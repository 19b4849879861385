"""The matmul attention of decode steps against torch's SDPA, on the masks the model builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.model.layers import attention, causal_mask, grouped_attention


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("window", [None, 5])
def test_grouped_attention_matches_sdpa(heads, kv_heads, t, window):
    g = torch.Generator().manual_seed(0)
    start = torch.tensor([0, 7, 12])  # rows at different lengths, one at its first token
    kv_len = int(start.max()) + t
    q = torch.randn(3, heads, t, 16, generator=g)
    k = torch.randn(3, kv_heads, kv_len, 16, generator=g)
    v = torch.randn(3, kv_heads, kv_len, 8, generator=g)
    mask = causal_mask(start, t, kv_len, window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(grouped_attention(q, k, v, mask, 0.3), want, rtol=1e-5, atol=1e-6)
    flat = attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(flat, want.transpose(1, 2).reshape(3, t, heads * 8), rtol=1e-5, atol=1e-6)
