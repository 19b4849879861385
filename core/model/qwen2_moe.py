"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): grouped-query attention with biases on q, k and v, then
MoE layers with softmax top-k routing and one shared expert whose output a sigmoid gate scales;
`mlp_only_layers` and `decoder_sparse_step` pick the layers that keep a dense MLP, as in Qwen3-MoE.

Parameter names equal the checkpoint's, so loading is a plain mapping (routed experts are stacked).
"""

from __future__ import annotations

import torch
from torch import nn

from core.model.causal_lm import DecoderLayer, GQACausalLM
from core.model.config import ModelConfig
from core.model.layers import MLP, Experts, GQAttention, Linear, Router
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


class Qwen2MoeForCausalLM(GQACausalLM):
    """Qwen2-MoE on the shared forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        layers = [DecoderLayer(cfg, i, GQAttention(cfg),
                               SparseMoeBlock(cfg) if is_sparse(cfg, i) else MLP(cfg.hidden_size, cfg.intermediate_size))
                  for i in range(cfg.num_hidden_layers)]
        super().__init__(cfg, layers)
