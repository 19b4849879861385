"""Picks the implementation of each op for the tensors it is given: the Triton kernels for CUDA
tensors; on the CPU, the CPU paths (`kernels.cpu`) where there is one, else the PyTorch references
(`kernels.reference`). MERIDIAN_KERNELS=reference forces the references everywhere (debugging,
bisecting a numerical difference)."""

from __future__ import annotations

import importlib
import os
import sys

import torch

from kernels import cpu, reference


def references_forced() -> bool:
    """MERIDIAN_KERNELS=reference: every op takes its PyTorch reference."""
    return os.environ.get("MERIDIAN_KERNELS", "").lower() == "reference"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True where the Triton kernels run: every tensor on CUDA and references not forced."""
    # The device test first: it is what answers on CPU, and it costs less than the environment lookup.
    return "kernels.fused_moe" in sys.modules and all(t.is_cuda for t in tensors) and not references_forced()


def use_cpu(*tensors: torch.Tensor) -> bool:
    """True where the CPU paths run: every tensor on the CPU and references not forced."""
    return all(t.device.type == "cpu" for t in tensors) and not references_forced()


def _kernel(name: str):
    """The kernel module `kernels.<name>` (the package binds some of these names to functions)."""
    return importlib.import_module(f"kernels.{name}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Fused (residual add +) RMSNorm; see `reference.rms_norm`."""
    if use_triton(x, weight) and (residual is None or residual.dtype == x.dtype):
        return _kernel("rmsnorm").rms_norm(x, weight, eps, residual)
    if use_cpu(x, weight):
        return cpu.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def route(logits: torch.Tensor, top_k: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert scoring and (group-limited) top-k; see `reference.route`. Ids come back best first
    from the kernel, in an unspecified order from the reference."""
    if use_triton(logits):
        return _kernel("router").route(logits, top_k, **kwargs)
    return reference.route(logits, top_k, **kwargs)


def fused_moe(x, w13, w2, topk_weights, topk_ids, *, w13_scale=None, w2_scale=None) -> torch.Tensor:
    """Routed experts with SwiGLU and the weighted top-k sum; see `reference.fused_moe`. With
    `w13_scale` and `w2_scale` (fp32 [E, ceil(N/128), ceil(K/128)], DeepSeek-V3's
    `weight_scale_inv`), w13 and w2 are fp8 e4m3 with 128x128 block scales: the w8a8 path,
    see `reference.fused_moe_fp8`."""
    if use_triton(x, w13, w2, topk_ids):
        return _kernel("fused_moe").fused_moe(
            x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale
        )
    if w13_scale is not None:
        return reference.fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    if use_cpu(x, w13, w2, topk_ids):
        return cpu.fused_moe(x, w13, w2, topk_weights, topk_ids)
    return reference.fused_moe(x, w13, w2, topk_weights, topk_ids)
