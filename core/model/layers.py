"""Layers every family shares: RMSNorm, rotary embeddings (default and YaRN), SwiGLU MLP, the MoE
block on the kernel dispatcher, grouped-query attention and the causal mask over a KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.cpu import GEMM_ROW_MULTIPLE, pad_rows
from core.model.config import ModelConfig, RopeConfig





class Linear(nn.Linear):
    """nn.Linear whose rows come out the same whatever else is in the batch, on CPU too.

    Continuous batching puts a sequence's rows beside different neighbours at every step; a
    sampled token must not depend on them (a resumed or concurrent stream must equal a solo run of
    the same seeded request), and a near-tied expert choice would turn a last-bit difference into
    another token. On CPU, row counts are padded to a multiple of GEMM_ROW_MULTIPLE.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if x.is_cuda or rows % GEMM_ROW_MULTIPLE == 0:
            return super().forward(x)
        flat = pad_rows(x.reshape(rows, x.shape[-1]))
        return super().forward(flat)[:rows].reshape(*x.shape[:-1], self.out_features)

class RMSNorm(nn.Module):
    """Root-mean-square norm (fp32 inside), through the kernel dispatcher."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the factor applied to cos/sin (as transformers)."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # high-frequency dims keep their frequency, low ones are interpolated
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, laid out as cat(freqs, freqs) like transformers."""

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        self.rope, self.dim = rope, dim
        inv_freq, self.attention_factor = rope_frequencies(rope, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_tables(self) -> None:
        """Recompute the frequencies (after the module was built on the meta device)."""
        self.inv_freq = rope_frequencies(self.rope, self.dim)[0].to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by cos/sin [B, T, d].

    `interleave`: DeepSeek pairs dims (0,1), (2,3)...; the result comes out de-interleaved (evens then
    odds), as transformers does it. Queries and keys get the same layout, so their dot products hold.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if not interleave:
        return x * cos + rotate_half(x) * sin
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_mask(start: torch.Tensor, length: int, kv_length: int, window: int | None = None) -> torch.Tensor:
    """Bool mask [B, 1, T, L]: query t of row b (at position start[b] + t) sees keys 0..start[b] + t,
    and with a sliding `window` only the last `window` of them (as transformers' sliding mask).

    Rows of a batch have their own starts, so one decode step serves requests of any lengths;
    cache entries past a row's own length are never seen.
    """
    q_pos = (start[:, None] + torch.arange(length, device=start.device)[None, :])[:, :, None]
    k_pos = torch.arange(kv_length, device=start.device)[None, None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask.unsqueeze(1)


# Up to this many queries per row (decode), attention runs as matmuls (`grouped_attention`): on CPU,
# SDPA with a mask and grouped heads took 3.7 ms where the matmuls take 0.25 ms (64 decode rows over
# MLA's one latent head, torch 2.13). Longer queries (prefill) keep SDPA's fused kernels.
FEW_QUERIES = 4


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention, q [B, H, T, d], k/v [B, H or fewer (grouped), L, d]: returns [B, T, H * dv]."""
    if q.shape[2] <= FEW_QUERIES:
        out = grouped_attention(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention as matmuls, q [B, H, T, d], k/v [B, kv heads, L, d] -> [B, H, T, dv].

    The query heads of a kv head become extra query rows of it, so k and v are read as they are,
    never expanded. Softmax in fp32, as transformers' eager path. (Not batch-invariant: the softmax
    and probs @ v reduce over the batch's padded key length; cutting each row to its own length
    fixes that but cost a third of the CPU throughput at 16 rows, so it waits for a better way.)"""
    b, h, t, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = h // kv_heads
    scores = torch.matmul(q.reshape(b, kv_heads, group * t, d), k.transpose(-1, -2))
    scores = torch.where(mask.unsqueeze(2), scores.view(b, kv_heads, group, t, kv_len) * scale, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs.view(b, kv_heads, group * t, kv_len), v).view(b, h, t, -1)


class GQAttention(nn.Module):
    """Grouped-query attention (Mixtral, Qwen3-MoE); the cache holds rotated keys and values per kv head.

    `qk_norm`: Qwen3 RMS-normalises each head of q and k before the rotation.
    """

    def __init__(self, cfg: ModelConfig, qk_norm: bool = False) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = Linear(h, self.heads * d, bias=cfg.attention_bias)
        self.k_proj = Linear(h, self.kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = Linear(h, self.kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = Linear(self.heads * d, h, bias=cfg.attention_bias)
        if qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = qk_norm
        self.scale = d**-0.5

    def forward(self, x, cos, sin, mask, cache, layer, slots, start) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        k, v = cache.update(layer, slots, start, (k.transpose(1, 2), v))
        return self.o_proj(attention(q, k.transpose(1, 2), v.transpose(1, 2), mask, self.scale))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Expert scores (fp32, as transformers computes them) and the top-k choice, via kernels.route."""

    def __init__(self, cfg: ModelConfig, correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.top_k = cfg.num_experts_per_tok
        self.options = dict(
            scoring=cfg.scoring,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.float() if x.is_cuda else pad_rows(x.float())  # batch invariance, as Linear
        logits = F.linear(flat, self.weight.float())[: x.shape[0]]
        return kernels.route(logits, self.top_k, correction_bias=self.e_score_correction_bias, **self.options)


class Experts(nn.Module):
    """All routed experts as two gathered tensors, the layout kernels.fused_moe takes."""

    def __init__(self, n_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return kernels.fused_moe(x, self.gate_up_proj, self.down_proj, weights, ids)


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts."""

    def __init__(self, cfg: ModelConfig, correction_bias: bool = False) -> None:
        super().__init__()
        self.gate = Router(cfg, correction_bias)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)
        out = self.experts(flat, weights, ids).view_as(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)
