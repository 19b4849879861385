"""DeepSeek-V3: multi-head latent attention (low-rank q and kv, decoupled RoPE), dense MLP layers
first, then MoE layers with shared experts and sigmoid, bias-corrected, group-limited routing.
DeepSeek-V2 (and V2-Lite) is the same network routed by a softmax without the bias (its config,
`ModelConfig`, says how), so it runs on this code too.

Parameter names equal the checkpoint's, so loading is a plain mapping (routed experts are stacked).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.cpu import invariant_rows, pad_rows
from core.model.batch import Batch
from core.model.causal_lm import CausalLM, DecoderLayer
from core.model.config import ModelConfig
from core.model.layers import (
    MLP, Linear, MergedLinear, MoE, RMSNorm, apply_rope, attention, grouped_attention, yarn_mscale,
)


class MLAttention(nn.Module):
    """Multi-head latent attention; the cache holds the normed kv latent and the rotated rope key."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_attention_heads
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        kv_a = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, n * self.qk_head_dim, bias=False)
            self.kv_a_proj_with_mqa = Linear(h, kv_a, bias=cfg.attention_bias)
        else:  # both down-projections read x: one product
            self.qkv_a_proj = MergedLinear(h, {"q_a_proj": cfg.q_lora_rank, "kv_a_proj_with_mqa": kv_a},
                                           bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = Linear(cfg.q_lora_rank, n * self.qk_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(n * cfg.v_head_dim, h, bias=cfg.attention_bias)
        self.scale = self.qk_head_dim**-0.5
        if cfg.rope.type != "default" and cfg.rope.mscale_all_dim:
            # YaRN sharpens the softmax too, by mscale squared (q and k each carry one factor).
            self.scale *= yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2

    def forward(self, x: torch.Tensor, batch: Batch, layer: int) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        nope, rope, n = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            q_a, kv_a = self.qkv_a_proj.split(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.view(b, t, n, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([nope, rope], dim=-1)
        latent, k_rot = kv_a.split([cfg.kv_lora_rank, rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        # The rope key rotates as one more head of the query: one rotation for both.
        rotated = apply_rope(torch.cat([q_rot, k_rot.unsqueeze(1)], dim=1), batch.cos, batch.sin,
                             cfg.rope_interleave)
        q_rot, k_rot = rotated[:, :n], rotated[:, n]
        # One cache entry [latent | rope key]: one write and one read per layer, and the absorbed
        # path's key is the cached row as it is.
        (cached,) = batch.update_cache(layer, (torch.cat([latent, k_rot], dim=-1),))
        # Absorbed where it reads less; never for a prefill, whose rows must take one path whatever
        # width their batch pads them to (batch invariance).
        if not batch.prefill and t * (2 * cfg.kv_lora_rank + rope) < cfg.kv_lora_rank * (nope + cfg.v_head_dim):
            return self.o_proj(self._absorbed(q_nope, q_rot, cached, batch.mask))
        latent, k_rot = cached.split([cfg.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(latent).view(b, -1, n, nope + cfg.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.unsqueeze(1).expand(-1, n, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        return self.o_proj(attention(q, k, v, batch, self.scale))

    def _absorbed(self, q_nope, q_rot, cached, mask) -> torch.Tensor:
        """Attention in the latent space: kv_b_proj folded into the query (keys) and the output (values).

        Few queries over a long cache (decode) then skip up-projecting every cached latent each step;
        all heads share one latent "kv head": the cached [latent | rope key] rows are the keys, their
        latent part the values. Returns [B, T, heads * v_head_dim].
        """
        cfg = self.cfg
        n, nope, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
        b, t = q_nope.shape[0], q_nope.shape[2]
        w_keys, w_values = self.kv_b_proj.weight.view(n, nope + cfg.v_head_dim, r).split([nope, cfg.v_head_dim], 1)
        q_latent = per_head(q_nope, w_keys)  # [B, heads, T, r]
        k = cached.unsqueeze(1)
        out = grouped_attention(torch.cat([q_latent, q_rot], dim=-1), k, k[..., :r], mask, self.scale)
        out = per_head(out, w_values.transpose(1, 2))  # [B, heads, T, v_head_dim]
        return out.transpose(1, 2).reshape(b, t, -1)


def per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d] times each head's own matrix w [H, d, e] -> [B, H, T, e].

    One bmm with the heads as its batch: a broadcast matmul would copy the weights for every row."""
    b, h, t, d = x.shape
    rows = x.transpose(0, 1).reshape(h, b * t, d)
    if x.is_cuda:
        out = torch.bmm(rows, w)
    else:  # batch invariance, as layers.Linear
        out = invariant_rows(lambda part: torch.bmm(part, w), pad_rows(rows, dim=1), dim=1)[:, : b * t]
    return out.reshape(h, b, t, -1).transpose(0, 1)


def feed_forward(cfg: ModelConfig, index: int) -> nn.Module:
    """Layer `index`'s MLP: dense below first_k_dense_replace, experts (and shared experts) from there on."""
    if index < cfg.first_k_dense_replace:
        return MLP(cfg.hidden_size, cfg.intermediate_size)
    return MoE(cfg, correction_bias=cfg.correction_bias)


class DeepseekV3ForCausalLM(CausalLM):
    """DeepSeek-V3 on the shared forward pass; rope acts on the qk_rope_head_dim dims only."""

    def __init__(self, cfg: ModelConfig) -> None:
        layers = [DecoderLayer(cfg, i, MLAttention(cfg), feed_forward(cfg, i)) for i in range(cfg.num_hidden_layers)]
        super().__init__(cfg, layers, cfg.qk_rope_head_dim, cfg.rope_interleave)

    def cache_layout(self) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer, the per-token shape the cache stores: the kv latent and the shared rope key, side by side."""
        entry = ((self.config.kv_lora_rank + self.config.qk_rope_head_dim,),)
        return [entry] * self.config.num_hidden_layers
