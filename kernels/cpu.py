"""CPU implementations the dispatcher takes off CUDA where the reference's op count, not its math,
is the cost: a decode step of a small model is hundreds of tiny ops, each paying the same fixed
overhead. Same math as `kernels.reference`; tests/kernels/test_cpu.py holds them to it.

`fused_moe`: the reference finds each expert's tokens with a boolean scan and a host sync and
scatters each expert's output with its own index_add, about ten ops per expert. Here the routed rows
are sorted by expert once, so each expert's GEMMs run over a contiguous slice (one grouped GEMM per
projection when most experts are hit); SwiGLU, the un-sort and the weighted top-k sum each run once
over all rows. Only fp32 rounding (the order of the top-k sum) differs from the reference.

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


def _grouped_linear(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows [S, K] sorted by expert, counts[e] of them for expert e; weight [E, N, K] -> [S, N]."""
    # F.grouped_mm visits every expert, hit or not: worth it once the rows could hit most of them.
    if rows.shape[0] >= weight.shape[0] and _grouped_mm_fits(rows, weight):
        return F.grouped_mm(rows, weight.transpose(1, 2), offs=counts.cumsum(0, dtype=torch.int32))
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    sizes = counts.tolist()  # the one host sync
    # Whole-tensor splits: a few ops per call rather than a few per expert.
    for n, x, w, y in zip(sizes, rows.split(sizes), weight.transpose(1, 2).unbind(0), out.split(sizes)):
        if n:
            torch.mm(x, w, out=y)
    return out


def _grouped_mm_fits(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether F.grouped_mm takes these operands: it exists, and every base address and row stride is
    a multiple of 16 bytes (older CPU kernels refuse others; a memory-mapped checkpoint may have them)."""
    size = rows.element_size()
    return (
        hasattr(F, "grouped_mm")
        and rows.dtype == weight.dtype
        and all(s * size % 16 == 0 for s in (rows.stride(0), weight.stride(0), weight.stride(1)))
        and rows.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


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
