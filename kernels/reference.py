"""PyTorch references for every kernel: the ground truth the Triton kernels are tested against,
and the path the dispatcher takes where there is no CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in fp32, cast back to x's dtype. With `residual`, x + residual is normed and also
    returned (the new residual stream), as fused add+norm kernels do."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if residual is None else (y, residual)


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    correction_bias: torch.Tensor | None = None,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    group_score: str = "top2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice for each token: (weights fp32 [T, k], ids int32 [T, k]).

    scoring="softmax": Mixtral / Qwen3-MoE / DeepSeek-V2. scoring="sigmoid": DeepSeek-V3, where the
    correction bias steers the choice but not the weights. With `n_group` > 1, experts are picked only
    inside the `topk_group` groups that score highest: by the sum of their two best (biased) scores
    (group_score="top2", DeepSeek-V3) or by their best one ("max", DeepSeek-V2's group_limited_greedy).
    """
    logits = logits.float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = rank_groups(grouped, group_score)
        keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, e)
        # -inf, not 0: a biased score can be negative, and a dropped group must never win.
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def rank_groups(grouped: torch.Tensor, group_score: str) -> torch.Tensor:
    """Each group's score from its experts' [T, groups, experts per group]: the sum of its two best
    ("top2", DeepSeek-V3) or its best ("max", DeepSeek-V2)."""
    return grouped.topk(2, dim=-1).values.sum(-1) if group_score == "top2" else grouped.amax(-1)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Routed experts with SwiGLU: sum_k w_k * W2[e_k] (silu(G[e_k] x) * (U[e_k] x)).

    x [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_* [T, k]. The per-expert
    loop is the readable reference, not a fast path.
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).long()
    flat_tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    flat_w = topk_weights.reshape(-1).float()
    for e in flat_ids.unique().tolist():
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = flat_tok[sel]
        gate_up = x[tok] @ w13[e].t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = (h @ w2[e].t()).float() * flat_w[sel, None]
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_EPS = 1e-10  # floor on a group's absolute maximum, so an all-zero group gets a finite scale


def quant_fp8_rows(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-`group`-column fp8 e4m3 quantization of activations, as DeepSeek-V3's
    `act_quant`: (fp8 [T, K], scales fp32 [T, ceil(K / group)]) with x ~= q * scale."""
    t, k = x.shape
    pad = (-k) % group
    xf = F.pad(x.float(), (0, pad)).view(t, -1, group)
    scale = xf.abs().amax(-1).clamp_min(FP8_EPS) / FP8_MAX
    q = (xf / scale[..., None]).to(torch.float8_e4m3fn).view(t, -1)[:, :k]
    return q, scale


def quant_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128-block fp8 e4m3 quantization of weights [..., N, K], as DeepSeek-V3 ships them:
    (fp8 [..., N, K], `weight_scale_inv` fp32 [..., ceil(N / block), ceil(K / block)])."""
    *lead, n, k = w.shape
    pn, pk = (-n) % block, (-k) % block
    wf = F.pad(w.float(), (0, pk, 0, pn))
    blocks = wf.view(*lead, (n + pn) // block, block, (k + pk) // block, block)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(FP8_EPS) / FP8_MAX
    q = (blocks / scale[..., :, None, :, None]).to(torch.float8_e4m3fn)
    q = q.view(*lead, n + pn, k + pk)[..., :n, :k]
    return q.contiguous(), scale


def dequant_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of `quant_fp8_blocks`, in fp32."""
    n, k = q.shape[-2:]
    s = scale.repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]
    return q.float() * s


def fused_moe_fp8(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
) -> torch.Tensor:
    """`fused_moe` in DeepSeek-V3's w8a8 fp8: weights fp8 e4m3 with 128x128 block scales
    (`weight_scale_inv`), activations (x, then the SwiGLU output) quantized per token per 128
    columns on the fly; products accumulate in fp32."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).long()
    flat_tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    flat_w = topk_weights.reshape(-1).float()
    for e in flat_ids.unique().tolist():
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = flat_tok[sel]
        xq, xs = quant_fp8_rows(x[tok])
        a = xq.float() * xs.repeat_interleave(128, -1)[:, : x.shape[1]]
        gate_up = a @ dequant_fp8_blocks(w13[e], w13_scale[e]).t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        hq, hs = quant_fp8_rows(h.to(x.dtype))
        a = hq.float() * hs.repeat_interleave(128, -1)[:, :inter]
        y = (a @ dequant_fp8_blocks(w2[e], w2_scale[e]).t()) * flat_w[sel, None]
        out.index_add_(0, tok, y)
    return out.to(x.dtype)
