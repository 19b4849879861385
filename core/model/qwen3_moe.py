"""Qwen3-MoE: grouped-query attention with per-head RMSNorm on q and k, then MoE layers with softmax
top-k routing (optionally renormalised); `mlp_only_layers` and `decoder_sparse_step` pick the layers
that keep a dense MLP instead.

Parameter names equal the checkpoint's, so loading is a plain mapping (routed experts are stacked).
"""

from __future__ import annotations

import torch
from torch import nn

from core.model.batch import Batch
from core.model.causal_lm import CausalLM
from core.model.config import ModelConfig
from core.model.layers import MLP, GQAttention, MoE, RMSNorm


def is_sparse(cfg: ModelConfig, index: int) -> bool:
    """Whether layer `index` runs experts (transformers' rule)."""
    return (
        index not in cfg.mlp_only_layers
        and cfg.n_routed_experts > 0
        and (index + 1) % cfg.decoder_sparse_step == 0
    )


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP (MoE or dense)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = GQAttention(cfg, qk_norm="head")
        self.mlp = MoE(cfg) if is_sparse(cfg, index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE on the shared forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)], cfg.head_dim)
        self.sliding_window = cfg.sliding_window

    def cache_layout(self) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer: rotated keys and values, [kv heads, head dim] per token."""
        kv = (self.config.num_key_value_heads, self.config.head_dim)
        return [(kv, kv)] * self.config.num_hidden_layers
