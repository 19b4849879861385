"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): grouped-query attention with biases on q, k and v, then
MoE layers with softmax top-k routing and one shared expert whose output a sigmoid gate scales;
`mlp_only_layers` and `decoder_sparse_step` pick the layers that keep a dense MLP, as in Qwen3-MoE.

Parameter names equal the checkpoint's, so loading is a plain mapping (routed experts are stacked).
"""

from __future__ import annotations

import torch
from torch import nn

from core.model.batch import Batch
from core.model.causal_lm import CausalLM
from core.model.config import ModelConfig
from core.model.layers import MLP, Experts, GQAttention, Linear, RMSNorm, Router
from core.model.qwen3_moe import is_sparse


class SparseMoeBlock(nn.Module):
    """Routed experts plus the shared expert, scaled per token by sigmoid(shared_expert_gate(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg, correction_bias=False)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        routed = self.experts(flat, weights, ids).view_as(x)
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP (MoE or dense)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = GQAttention(cfg)
        self.mlp = SparseMoeBlock(cfg) if is_sparse(cfg, index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2MoeForCausalLM(CausalLM):
    """Qwen2-MoE on the shared forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)], cfg.head_dim)

    def cache_layout(self) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer: rotated keys and values, [kv heads, head dim] per token."""
        kv = (self.config.num_key_value_heads, self.config.head_dim)
        return [(kv, kv)] * self.config.num_hidden_layers
