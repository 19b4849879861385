"""Fused MoE router in Triton: scoring (softmax, or sigmoid plus DeepSeek-V3's correction bias),
group-limited top-k, gather, renormalization and scaling in one pass over the logits.
Reference: `kernels.reference.route`. Ids come out best first (the reference's order is
unspecified: `topk(sorted=False)`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    T,
    E,
    stride_t,
    scaling,
    TOP_K: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    NORM: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
):
    """One program routes BLOCK_T tokens; top-k by repeated arg-max (k is small)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    logits = tl.where(col_ok[None, :], logits, -float("inf"))  # rows past T stay finite
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = e / tl.sum(e, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    neg = -float("inf")
    choice = tl.where(col_ok[None, :], choice, neg)
    if N_GROUP > 1:
        # a group's score: the sum of its two best (biased) scores (DeepSeek-V3), or its best (V2)
        group = cols // (E // N_GROUP)
        gidx = tl.arange(0, G_PAD)
        gscore = tl.full([BLOCK_T, G_PAD], neg, tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (group == g)[None, :]
            c = tl.where(in_g, choice, neg)
            best = tl.max(c, axis=1)
            if GROUP_TOP2:
                first = tl.argmax(c, axis=1)
                best = best + tl.max(tl.where(cols[None, :] == first[:, None], neg, c), axis=1)
            gscore = tl.where(gidx[None, :] == g, best[:, None], gscore)
        keep = tl.zeros([BLOCK_T, E_PAD], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gbest = tl.argmax(gscore, axis=1)
            keep = keep | (group[None, :] == gbest[:, None])
            gscore = tl.where(gidx[None, :] == gbest[:, None], neg, gscore)
        # as Hugging Face (transformers >= 5): dropped groups score -inf, so a negative biased
        # score in a kept group still beats every expert of a dropped one
        choice = tl.where(keep, choice, neg)
    kidx = tl.arange(0, K_PAD)
    top_ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    top_w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1).to(tl.int32)
        picked = cols[None, :] == best[:, None]
        w = tl.sum(tl.where(picked, scores, 0.0), axis=1)
        top_ids = tl.where(kidx[None, :] == j, best[:, None], top_ids)
        top_w = tl.where(kidx[None, :] == j, w[:, None], top_w)
        choice = tl.where(picked, neg, choice)
    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * scaling
    out_mask = row_ok[:, None] & (kidx[None, :] < TOP_K)
    out_off = rows[:, None] * TOP_K + kidx[None, :]
    tl.store(weights_ptr + out_off, top_w, mask=out_mask)
    tl.store(ids_ptr + out_off, top_ids, mask=out_mask)


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
    """Expert choice for each token: (weights fp32 [T, k], ids int32 [T, k]); see `reference.route`."""
    assert scoring in ("softmax", "sigmoid") and group_score in ("top2", "max")
    t, e = logits.shape
    assert e % n_group == 0 and top_k <= e
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t == 0:
        return weights, ids
    e_pad = triton.next_power_of_2(e)
    block_t = max(1, min(16, 4096 // e_pad, triton.next_power_of_2(t)))
    bias = correction_bias if correction_bias is not None else logits
    _route_kernel[(triton.cdiv(t, block_t),)](
        logits,
        bias,
        weights,
        ids,
        t,
        e,
        logits.stride(0),
        float(routed_scaling_factor),
        TOP_K=top_k,
        E_PAD=e_pad,
        BLOCK_T=block_t,
        SIGMOID=scoring == "sigmoid",
        HAS_BIAS=correction_bias is not None,
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        G_PAD=triton.next_power_of_2(n_group),
        K_PAD=triton.next_power_of_2(top_k),
        NORM=norm_topk_prob,
        GROUP_TOP2=group_score == "top2",
        num_warps=4,
    )
    return weights, ids
