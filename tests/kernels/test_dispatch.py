"""The dispatcher: references off CUDA; on CUDA the kernels, CUDA-graph capturable."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cpu, dispatch, reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_takes_the_cpu_paths_or_the_references():
    x = torch.randn(3, 32)
    w13, w2 = torch.randn(4, 48, 32), torch.randn(4, 32, 24)
    logits = torch.randn(3, 4)
    wts, ids = kernels.route(logits, 2)
    assert all(torch.equal(a, b) for a, b in zip((wts, ids), reference.route(logits, 2)))
    assert torch.equal(kernels.fused_moe(x, w13, w2, wts, ids), cpu.fused_moe(x, w13, w2, wts, ids))
    w = torch.rand(32)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


def test_references_can_be_forced_on_cpu():
    x = torch.randn(3, 32)
    w13, w2 = torch.randn(4, 48, 32), torch.randn(4, 32, 24)
    wts, ids = kernels.route(torch.randn(3, 4), 2)
    dispatch.force_references()
    try:
        assert torch.equal(kernels.fused_moe(x, w13, w2, wts, ids), reference.fused_moe(x, w13, w2, wts, ids))
    finally:
        dispatch.force_references(False)
    assert torch.equal(kernels.fused_moe(x, w13, w2, wts, ids), cpu.fused_moe(x, w13, w2, wts, ids))


@cuda
@pytest.mark.gpu
def test_cuda_moe_layer_in_a_graph():
    """Route, then experts, captured and replayed: a real-sized layer against the reference."""
    t, h, i, e, k = 64, 2048, 1408, 64, 6
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(e, 2 * i, h, device="cuda") / h**0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda") / i**0.5).bfloat16()
    logits = torch.randn(t, e, device="cuda")
    wts, ids = kernels.route(logits, k, scoring="softmax", norm_topk_prob=False)
    kernels.fused_moe(x, w13, w2, wts, ids)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.fused_moe(x, w13, w2, wts, ids)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = reference.fused_moe(x.float(), w13.float(), w2.float(), wts, ids)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 300])
def test_cuda_fp8_layer_deepseek_v3_shape(t):
    """fp8 w8a8 at a DeepSeek-V3-like width (few experts to stay small)."""
    h, i, e, k = 7168, 2048, 8, 4
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w13q, w13s = reference.quant_fp8_blocks(torch.randn(e, 2 * i, h, device="cuda") / h**0.5)
    w2q, w2s = reference.quant_fp8_blocks(torch.randn(e, h, i, device="cuda") / i**0.5)
    wts = torch.rand(t, k, device="cuda").softmax(-1)
    ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)]).int()
    out = kernels.fused_moe(x, w13q, w2q, wts, ids, w13_scale=w13s, w2_scale=w2s)
    ref = reference.fused_moe_fp8(x, w13q, w2q, wts, ids, w13s, w2s)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 2e-2, err
