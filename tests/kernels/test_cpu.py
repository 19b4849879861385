"""The CPU paths (`kernels.cpu`) against the PyTorch references they stand in for."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu, reference


def routing(tokens: int, experts: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing of random logits: (weights, ids)."""
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    return reference.route(logits, k)


@pytest.mark.parametrize("tokens", [1, 3, 16, 130])  # below and above the grouped-GEMM threshold
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_reference(tokens, dtype):
    e, h, i, k = 16, 64, 32, 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i**0.5).to(dtype)
    wts, ids = routing(tokens, e, k)
    got, want = cpu.fused_moe(x, w13, w2, wts, ids), reference.fused_moe(x, w13, w2, wts, ids)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(got, want, **tol)


def test_fused_moe_idle_experts_and_ragged_shapes():
    """Experts no token picks, one expert taking most rows, and odd widths."""
    e, h, i, k, t = 8, 24, 10, 2, 12
    x = torch.randn(t, h)
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    ids = torch.tensor([[0, 5]] * (t - 2) + [[5, 7], [7, 0]], dtype=torch.int32)
    wts = torch.rand(t, k)
    torch.testing.assert_close(cpu.fused_moe(x, w13, w2, wts, ids), reference.fused_moe(x, w13, w2, wts, ids),
                               rtol=1e-5, atol=1e-4)


def test_fused_moe_is_batch_invariant():
    """A token's output is the same bits whatever other tokens share the call (and its experts)."""
    torch.manual_seed(3)
    e, h, i, k, t = 16, 64, 32, 4, 40
    x = torch.randn(t, h)
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    wts, ids = torch.rand(t, k), torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)
    together = cpu.fused_moe(x, w13, w2, wts, ids)
    for row in (0, 7, 39):
        alone = cpu.fused_moe(x[row:row + 1], w13, w2, wts[row:row + 1], ids[row:row + 1])
        assert torch.equal(alone[0], together[row])
    pair = cpu.fused_moe(x[5:7], w13, w2, wts[5:7], ids[5:7])
    assert torch.equal(pair, together[5:7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_reference(dtype, with_residual):
    x = (3 * torch.randn(4, 5, 96)).to(dtype)
    w = (1 + 0.1 * torch.randn(96)).to(dtype)
    res = torch.randn(4, 5, 96).to(dtype) if with_residual else None
    got, want = cpu.rms_norm(x, w, 1e-6, res), reference.rms_norm(x, w, 1e-6, res)
    if with_residual:
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    assert torch.equal(got, want)
