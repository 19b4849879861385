"""Qwen3-MoE: grouped-query attention with per-head RMSNorm on q and k, then MoE layers with softmax
top-k routing (optionally renormalised); `mlp_only_layers` and `decoder_sparse_step` pick the layers
that keep a dense MLP instead.

Parameter names equal the checkpoint's, so loading is a plain mapping (routed experts are stacked).
"""

from __future__ import annotations

from core.model.causal_lm import DecoderLayer, GQACausalLM
from core.model.config import ModelConfig
from core.model.layers import MLP, GQAttention, MoE


def is_sparse(cfg: ModelConfig, index: int) -> bool:
    """Whether layer `index` runs experts (transformers' rule, Qwen2-MoE's too)."""
    return (
        index not in cfg.mlp_only_layers
        and cfg.n_routed_experts > 0
        and (index + 1) % cfg.decoder_sparse_step == 0
    )


class Qwen3MoeForCausalLM(GQACausalLM):
    """Qwen3-MoE on the shared forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        layers = [DecoderLayer(cfg, i, GQAttention(cfg, qk_norm="head"),
                               MoE(cfg) if is_sparse(cfg, i) else MLP(cfg.hidden_size, cfg.intermediate_size))
                  for i in range(cfg.num_hidden_layers)]
        super().__init__(cfg, layers)
