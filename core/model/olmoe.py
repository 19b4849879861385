"""OLMoE: grouped-query attention with RMSNorm over the whole q and k projections (optionally
clamped, `clip_qkv`), then a MoE block in every layer with softmax top-k routing (optionally
renormalised) and no shared experts.

Parameter names equal the checkpoint's, so loading is a plain mapping (routed experts are stacked).
"""

from __future__ import annotations

import torch
from torch import nn

from core.model.batch import Batch
from core.model.causal_lm import CausalLM
from core.model.config import ModelConfig
from core.model.layers import GQAttention, MoE, RMSNorm


class DecoderLayer(nn.Module):
    """Pre-norm attention then the pre-norm MoE block."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = GQAttention(cfg, qk_norm="projection")
        self.mlp = MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class OlmoeForCausalLM(CausalLM):
    """OLMoE on the shared forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)], cfg.head_dim)

    def cache_layout(self) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer: rotated keys and values, [kv heads, head dim] per token."""
        kv = (self.config.num_key_value_heads, self.config.head_dim)
        return [(kv, kv)] * self.config.num_hidden_layers
