"""Picks the implementation of each op for the tensors it is given: the Triton kernels for CUDA
tensors; on the CPU, the CPU paths (`kernels.cpu`) where there is one, else the PyTorch references
(`kernels.reference`). MERIDIAN_KERNELS=reference at start-up, or `force_references()`, sends every
op to its reference (debugging, bisecting a numerical difference, timing with and without)."""

from __future__ import annotations

import importlib
import os
import sys

import torch

from kernels import cpu, reference

# kernels/__init__.py imports the Triton modules before this one, where triton imports at all.
_TRITON = "kernels.fused_moe" in sys.modules
_forced = os.environ.get("MERIDIAN_KERNELS", "").lower() == "reference"


def force_references(on: bool = True) -> None:
    """Send every op to its PyTorch reference (True) or back to the kernels (False)."""
    global _forced
    _forced = on


def use_triton(x: torch.Tensor) -> bool:
    """True where the Triton kernels run: `x` (whose device the op's other tensors share) on CUDA."""
    return x.is_cuda and _TRITON and not _forced


def use_cpu(x: torch.Tensor) -> bool:
    """True where the CPU paths run: `x` (whose device the op's other tensors share) on the CPU."""
    return x.device.type == "cpu" and not _forced


def _kernel(name: str):
    """The kernel module `kernels.<name>` (the package binds some of these names to functions)."""
    return importlib.import_module(f"kernels.{name}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Fused (residual add +) RMSNorm; see `reference.rms_norm`."""
    if use_triton(x) and (residual is None or residual.dtype == x.dtype):
        return _kernel("rmsnorm").rms_norm(x, weight, eps, residual)
    if use_cpu(x):
        return cpu.rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def route(logits: torch.Tensor, top_k: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert scoring and (group-limited) top-k; see `reference.route`. Ids come back best first
    from the kernel, in an unspecified order from the reference."""
    if use_triton(logits):
        return _kernel("router").route(logits, top_k, **kwargs)
    if use_cpu(logits):
        return cpu.route(logits, top_k, **kwargs)
    return reference.route(logits, top_k, **kwargs)


def fused_moe(x, w13, w2, topk_weights, topk_ids, *, w13_scale=None, w2_scale=None) -> torch.Tensor:
    """Routed experts with SwiGLU and the weighted top-k sum; see `reference.fused_moe`. With
    `w13_scale` and `w2_scale` (fp32 [E, ceil(N/128), ceil(K/128)], DeepSeek-V3's
    `weight_scale_inv`), w13 and w2 are fp8 e4m3 with 128x128 block scales: the w8a8 path,
    see `reference.fused_moe_fp8`."""
    if use_triton(x):
        return _kernel("fused_moe").fused_moe(
            x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale
        )
    if w13_scale is not None:
        return reference.fused_moe_fp8(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    if use_cpu(x):
        return cpu.fused_moe(x, w13, w2, topk_weights, topk_ids)
    return reference.fused_moe(x, w13, w2, topk_weights, topk_ids)
