"""Fused residual add + RMSNorm in Triton: one read of x (and the residual), one write of the
normed output (and the new residual). Reference: `kernels.reference.rms_norm`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    res_out_ptr,
    H,
    eps,
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row per program, in fp32; rounding points as the reference (the sum in x's dtype,
    the normed value in x's dtype before the weight)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = (
            x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        ).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / H + eps)
    normed = (h * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused (residual add +) RMSNorm; see `reference.rms_norm`."""
    shape = x.shape
    h = shape[-1]
    x2 = x.reshape(-1, h)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    res2 = res_out = None
    if residual is not None:
        res2 = residual.reshape(-1, h)
        res2 = res2 if res2.stride(-1) == 1 else res2.contiguous()
        res_out = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(rows,)](
            x2,
            res2 if res2 is not None else x2,
            weight,
            y,
            res_out if res_out is not None else y,
            h,
            float(eps),
            x2.stride(0),
            res2.stride(0) if res2 is not None else 0,
            y.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    y = y.view(shape)
    return y if residual is None else (y, res_out.view(shape))
