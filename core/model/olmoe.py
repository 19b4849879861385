"""OLMoE: grouped-query attention with RMSNorm over the whole q and k projections (optionally
clamped, `clip_qkv`), then a MoE block in every layer with softmax top-k routing (optionally
renormalised) and no shared experts.

Parameter names equal the checkpoint's, so loading is a plain mapping (routed experts are stacked).
"""

from __future__ import annotations

from core.model.causal_lm import DecoderLayer, GQACausalLM
from core.model.config import ModelConfig
from core.model.layers import GQAttention, MoE


class OlmoeForCausalLM(GQACausalLM):
    """OLMoE on the shared forward pass."""

    def __init__(self, cfg: ModelConfig) -> None:
        layers = [DecoderLayer(cfg, i, GQAttention(cfg, qk_norm="projection"), MoE(cfg))
                  for i in range(cfg.num_hidden_layers)]
        super().__init__(cfg, layers)
