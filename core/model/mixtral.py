"""Mixtral: grouped-query attention (sliding window when configured) and a sparse MoE block in
every layer, softmax top-k routing renormalised over the chosen experts, no shared experts.

Parameter names equal the checkpoint's (`block_sparse_moe`, experts' w1/w3 stacked as gate/up, w2 as
down), so loading is a plain mapping.
"""

from __future__ import annotations

from core.model.causal_lm import DecoderLayer, GQACausalLM
from core.model.config import ModelConfig
from core.model.layers import GQAttention, MoE


class MixtralForCausalLM(GQACausalLM):
    """Mixtral on the shared forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        layers = [DecoderLayer(cfg, i, GQAttention(cfg), MoE(cfg), mlp_name="block_sparse_moe")
                  for i in range(cfg.num_hidden_layers)]
        super().__init__(cfg, layers)
