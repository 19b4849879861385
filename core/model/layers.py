"""Layers every family shares: RMSNorm, rotary embeddings (default and YaRN), SwiGLU MLP, the MoE
block on the kernel dispatcher, grouped-query attention and the causal mask over a KV cache.

Batch invariance: on CPU a row's result never depends on the other rows of its batch, so a seeded
stream gives the same tokens alone or among others, and a stream resumed in another zone continues
exactly. Three things would otherwise leak across rows: BLAS takes other paths for other row
counts (`Linear` pads them), torch's vector loops round the scalar tail of a tensor another way
(the router pads its rows; `MLP` runs its activation on strided halves, which torch loops over row
by row), and reductions over the keys change with the batch's padded length (`attention`: keys
read in aligned lengths, probs @ v in fixed chunks, prefill rows one by one).
tests/core/test_batch_invariance.py holds each of these to it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.cpu import GEMM_ROW_MULTIPLE, elementwise_row_multiple, invariant_rows, pad_rows, row_step
from core.model.batch import Batch
from core.model.config import ModelConfig, RopeConfig


class Linear(nn.Linear):
    """nn.Linear whose rows come out the same whatever else is in the batch, on CPU too.

    Continuous batching puts a sequence's rows beside different neighbours at every step; a
    sampled token must not depend on them (a resumed or concurrent stream must equal a solo run of
    the same seeded request), and a near-tied expert choice would turn a last-bit difference into
    another token. On CPU, row counts are padded to a multiple of GEMM_ROW_MULTIPLE (decode steps
    arrive padded already, see CausalLM.forward).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if x.is_cuda or (rows % GEMM_ROW_MULTIPLE == 0 and row_step(rows) >= rows):
            return F.linear(x, self.weight, self.bias)
        flat = pad_rows(x.reshape(rows, x.shape[-1]))
        out = invariant_rows(lambda part: F.linear(part, self.weight, self.bias), flat)
        return out[:rows].reshape(*x.shape[:-1], self.out_features)


class MergedLinear(Linear):
    """Linear layers that read the same input, run as one product: one GEMM instead of several.

    `parts` maps each layer's checkpoint name, beside this module's (e.g. "gate_proj", "up_proj"),
    to its output rows; the loader stacks their tensors by rows into this weight (and bias)."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts' outputs of one product, as views."""
        return self(x).split(list(self.parts.values()), dim=-1)


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
    """cos/sin tables for given positions, laid out as cat(freqs, freqs) like transformers, shaped
    for `apply_rope`: [B, 1, T, dim], or [B, 1, T, dim / 2] for DeepSeek's interleaved pairs."""

    def __init__(self, rope: RopeConfig, dim: int, interleave: bool = False) -> None:
        super().__init__()
        self.rope, self.dim, self.interleave = rope, dim, interleave
        inv_freq, self.attention_factor = rope_frequencies(rope, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_tables(self) -> None:
        """Recompute the frequencies (after the module was built on the meta device)."""
        self.inv_freq = rope_frequencies(self.rope, self.dim)[0].to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None, :, None].float() * self.inv_freq.to(positions.device)
        emb = freqs if self.interleave else torch.cat((freqs, freqs), dim=-1)  # halves match for pairs
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate x [B, heads, T, d] by the tables of RotaryEmbedding (built with the same `interleave`).

    `interleave`: DeepSeek pairs dims (0,1), (2,3)...; the result comes out de-interleaved (evens then
    odds), as transformers does it. Queries and keys get the same layout, so their dot products hold.
    """
    if not interleave:
        return x * cos + rotate_half(x) * sin
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

# probs @ v reduces over the keys in chunks of this many, summed in order. CPU BLAS re-blocks a
# longer reduction by its length, so a row's sum would depend on the padded length of its batch;
# within a chunk the padding only appends exact zeros.
PV_CHUNK = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, scale: float) -> torch.Tensor:
    """Softmax attention, q [B, H, T, d], k/v [B, H or fewer (grouped), L, d]: returns [B, T, H * dv].

    Prefill rows on CPU each run alone at their own length, so a prompt's result never depends on
    what it was batched with (it also skips the padding's work)."""
    b, _, t, _ = q.shape
    if batch.prefill and not q.is_cuda:
        out = q.new_zeros(b, q.shape[1], t, v.shape[-1])
        for row, (start, n) in enumerate(batch.spans):
            keys = start + n
            out[row, :, :n] = _attend(q[row : row + 1, :, :n], k[row : row + 1, :, :keys],
                                      v[row : row + 1, :, :keys], batch.mask[row : row + 1, :, :n, :keys], scale)[0]
    else:
        out = _attend(q, k, v, batch.mask, scale)
    return out.transpose(1, 2).reshape(b, t, -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    if q.shape[2] <= FEW_QUERIES:
        return grouped_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention as matmuls, q [B, H, T, d], k/v [B, kv heads, L, d] -> [B, H, T, dv].

    The query heads of a kv head become extra query rows of it, so k and v are read as they are,
    never expanded. Softmax in fp32, as transformers' eager path. With L a multiple of
    `core.model.batch.KV_ALIGN`, a row's result is the same whatever padded length its batch has."""
    b, h, t, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = h // kv_heads
    scores = torch.matmul(q.reshape(b, kv_heads, group * t, d), k.transpose(-1, -2))
    scores = torch.where(mask.unsqueeze(2), scores.view(b, kv_heads, group, t, kv_len) * scale, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32)
    probs = probs if probs.dtype == v.dtype else probs.to(v.dtype)
    return weighted_values(probs.view(b, kv_heads, group * t, kv_len), v).view(b, h, t, -1)


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [..., M, L] @ v [..., L, dv], reduced over L in chunks of PV_CHUNK (see there)."""
    length = probs.shape[-1]
    if length <= PV_CHUNK or probs.is_cuda:
        return torch.matmul(probs, v)
    chunks = -(-length // PV_CHUNK)
    pad = chunks * PV_CHUNK - length
    probs = F.pad(probs, (0, pad)).unflatten(-1, (chunks, PV_CHUNK)).movedim(-2, -3)  # [..., n, M, C]
    v = F.pad(v, (0, 0, 0, pad)).unflatten(-2, (chunks, PV_CHUNK))  # [..., n, C, dv]
    return torch.matmul(probs, v).sum(-3)


class GQAttention(nn.Module):
    """Grouped-query attention (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); the cache holds rotated keys and
    values per kv head.

    `qk_norm`: "head", Qwen3 RMS-normalises each head of q and k before the rotation; "projection",
    OLMoE normalises the whole q and k projections. `cfg.clip_qkv` clamps q, k and v (OLMoE's option).
    """

    def __init__(self, cfg: ModelConfig, qk_norm: str | None = None) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = Linear(h, self.heads * d, bias=qkv_bias)
        self.k_proj = Linear(h, self.kv_heads * d, bias=qkv_bias)
        self.v_proj = Linear(h, self.kv_heads * d, bias=qkv_bias)
        self.o_proj = Linear(self.heads * d, h, bias=cfg.attention_bias)
        assert qk_norm in (None, "head", "projection")
        if qk_norm is not None:
            whole = qk_norm == "projection"
            self.q_norm = RMSNorm(self.heads * d if whole else d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_heads * d if whole else d, cfg.rms_norm_eps)
        self.qk_norm = qk_norm
        self.clip = cfg.clip_qkv
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, batch: Batch, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (y.clamp(-self.clip, self.clip) for y in (q, k, v))
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), batch.cos, batch.sin)
        k = apply_rope(k.transpose(1, 2), batch.cos, batch.sin)
        k, v = batch.update_cache(layer, (k.transpose(1, 2), v))
        return self.o_proj(attention(q, k.transpose(1, 2), v.transpose(1, 2), batch, self.scale))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up as one product.

    On CPU the activation then runs over a strided half of each row, which torch loops over row by
    row: every row rounds alike whatever the row count (a contiguous [rows, inter] tensor would
    put a row-count-dependent tail through the scalar exp)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, {"gate_proj": inter, "up_proj": inter})
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(x)
        return self.down_proj(F.silu(gate) * up)


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
        self.row_multiple = elementwise_row_multiple(cfg.n_routed_experts)
        self.options = dict(
            scoring=cfg.scoring,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            group_score=cfg.group_score,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Batch invariance, as Linear: on CPU the scoring runs over padded rows too, so that no real
        # row's scores fall in the scalar tail of torch's vector loops (which rounds exp another way).
        flat = x if x.dtype == torch.float32 else x.float()
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        if x.is_cuda:
            logits = F.linear(flat, weight)
        else:
            logits = invariant_rows(lambda part: F.linear(part, weight), pad_rows(flat, self.row_multiple))
        weights, ids = kernels.route(logits, self.top_k, correction_bias=self.e_score_correction_bias, **self.options)
        return (weights, ids) if len(ids) == len(x) else (weights[: len(x)], ids[: len(x)])


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
