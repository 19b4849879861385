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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice for each token: (weights fp32 [T, k], ids int32 [T, k]).

    scoring="softmax": Mixtral / Qwen3-MoE. scoring="sigmoid": DeepSeek-V3, where the correction bias
    steers the choice but not the weights, and experts are picked only inside the `topk_group` groups
    whose two best biased scores sum highest.
    """
    logits = logits.float()
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, e)
        choice = choice.masked_fill(expert_mask == 0, 0.0)
    ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


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
