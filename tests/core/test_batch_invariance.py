"""A sequence's logits do not depend on what else shares its batch: continuous batching moves
neighbours in and out at every step, and a seeded stream must equal a solo run of the same request."""

from __future__ import annotations

import torch

from core.engine.kv_cache import SlotKVCache
from core.model.layers import Linear
from core.model.loader import load_model


def test_linear_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layer = Linear(256, 512)
    x = torch.randn(32, 256)
    together = layer(x)
    for n in (1, 2, 3, 4, 5, 7, 17, 31):
        assert torch.equal(layer(x[:n]), together[:n]), n
    assert torch.equal(layer(x[None, :1])[0], together[:1])  # leading dims too
