"""CPU implementations the dispatcher takes off CUDA where the reference's op count, not its math,
is the cost: a decode step of a small model is hundreds of tiny ops, each paying the same fixed
overhead. Same math as `kernels.reference`; tests/kernels/test_cpu.py holds them to it.

`fused_moe`: the reference finds each expert's tokens with a boolean scan and a host sync and
scatters each expert's output with its own index_add, about ten ops per expert. Here the routed rows
are sorted by expert once, so each expert's GEMMs run over a contiguous slice; SwiGLU, the un-sort
and the weighted top-k sum each run once over all rows. (F.grouped_mm would save launches at large
batches, but rounds differently from mm, so a token's bits would depend on the batch.) Only fp32 rounding (the order of the top-k sum) differs from the reference.

`rms_norm`: torch's own RMSNorm, one op where the reference spells out seven.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_k w_k * W2[e_k] (silu(G[e_k] x) * (U[e_k] x)); shapes as `reference.fused_moe`."""
    tokens, k = topk_ids.shape
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).long()
    order = flat_ids.argsort(stable=True)  # routed rows (token, choice) grouped by expert
    counts = torch.bincount(flat_ids, minlength=w13.shape[0])
    rows = x.index_select(0, order // k)
    gate_up = _grouped_linear(rows, w13, counts)
    down = _grouped_linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2, counts)
    routed = torch.empty_like(down).index_copy_(0, order, down).view(tokens, k, -1)  # back to (token, choice)
    out = torch.bmm(topk_weights.float().unsqueeze(1), routed.float()).squeeze(1)  # fp32 sum, as the reference
    return out.to(x.dtype)


# CPU BLAS rounds a row differently with the row count of the call (GEMV and small-M paths below
# 4 rows; another split of the work across threads for odd counts). Row counts that are multiples
# of 4 all agree, so products are padded to one: a token's result then does not depend on how many
# other rows share the call (batch invariance: a stream's tokens must not depend on its neighbours
# in the batch). The model's linear layers use the same padding (core.model.layers.Linear).
GEMM_ROW_MULTIPLE = 4


def pad_rows(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """`x` with zero rows appended along `dim` up to a multiple of GEMM_ROW_MULTIPLE."""
    extra = -x.shape[dim] % GEMM_ROW_MULTIPLE
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _grouped_linear(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows [S, K] sorted by expert, counts[e] of them for expert e; weight [E, N, K] -> [S, N]."""
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    sizes = counts.tolist()  # the one host sync
    # Whole-tensor splits: a few ops per call rather than a few per expert.
    for n, x, w, y in zip(sizes, rows.split(sizes), weight.transpose(1, 2).unbind(0), out.split(sizes)):
        if n % GEMM_ROW_MULTIPLE == 0:
            torch.mm(x, w, out=y)
        else:
            y.copy_(torch.mm(pad_rows(x), w)[:n])
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm`: normalise in fp32, cast back to x's dtype, then scale by `weight`."""
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        y = F.rms_norm(x, x.shape[-1:], weight, eps)  # nothing to cast: the weight goes inside
    else:
        y = weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    return y if residual is None else (y, residual)
