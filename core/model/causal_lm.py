"""The forward pass every family shares: embed, rotate, mask, run the decoder layers, norm, project.

A family supplies its decoder layers (under `self.model`, the checkpoint's `model.` prefix), the rotary
table for its rope dims and the per-token shapes its layers keep in the KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from core.model.config import ModelConfig
from core.model.layers import Linear, RMSNorm, RotaryEmbedding, causal_mask


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (the checkpoint's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids in, next-token logits out, reading and writing the KV cache of the given slots."""

    sliding_window: int | None = None

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module], rope_dim: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, layers)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, rope_dim)

    def cache_layout(self) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer, the per-token shapes of the tensors the layer keeps in the cache."""
        raise NotImplementedError

    def forward(
        self,
        tokens: torch.Tensor,
        start: torch.Tensor,
        cache,
        slots: torch.Tensor,
        last_only: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] at positions start[b]..start[b]+T-1 -> logits [B, T or 1, V] in fp32.

        `lengths`: rows padded on the right hold lengths[b] real tokens; with `last_only` the logits
        are those of each row's last real token.
        """
        t = tokens.shape[1]
        positions = start[:, None] + torch.arange(t, device=tokens.device)[None, :]
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(positions, x.dtype)
        mask = causal_mask(start, t, int(start.max()) + t, self.sliding_window)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, slots, start)
        if last_only:
            if lengths is None:
                x = x[:, -1:]
            else:
                x = x[torch.arange(x.shape[0], device=x.device), lengths - 1].unsqueeze(1)
        return self.lm_head(self.model.norm(x)).float()
