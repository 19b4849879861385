"""Fused residual add + RMSNorm against the reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels import reference

# Triton's interpreter casts fp32 to bf16 by truncation, not to nearest: one ulp apart on CPU.
EXACT = {"rtol": 0, "atol": 0} if torch.cuda.is_available() else {"rtol": 8e-3, "atol": 0}

rmsnorm = importlib.import_module("kernels.rmsnorm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h", [64, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, h, with_residual, device):
    x = torch.randn(2, 3, h).to(dtype)
    w = (1 + 0.1 * torch.randn(h)).to(dtype)
    res = torch.randn(2, 3, h).to(dtype) if with_residual else None
    ref = reference.rms_norm(x, w, 1e-6, res)
    got = rmsnorm.rms_norm(x.to(device), w.to(device), 1e-6, res.to(device) if with_residual else None)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    if with_residual:
        torch.testing.assert_close(got[1].cpu(), ref[1], **EXACT)  # the sum rounds once
        ref, got = ref[0], got[0]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got.cpu(), ref, **tol)


def test_fp32_weight_promotes_like_reference(device):
    x, w = torch.randn(4, 64).to(torch.bfloat16), torch.rand(64)
    got = rmsnorm.rms_norm(x.to(device), w.to(device), 1e-5)
    ref = reference.rms_norm(x, w, 1e-5)
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5 if torch.cuda.is_available() else 8e-3, atol=1e-5)
