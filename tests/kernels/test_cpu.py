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


ROUTES = [  # (experts, top_k, options, with a correction bias)
    (8, 2, dict(scoring="softmax"), False),
    (64, 6, dict(scoring="softmax", norm_topk_prob=False), False),
    (64, 8, dict(scoring="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5), True),
    (16, 1, dict(scoring="sigmoid", n_group=4, topk_group=2), True),
    (12, 3, dict(scoring="softmax", routed_scaling_factor=1.5), False),
    (32, 6, dict(scoring="softmax", n_group=8, topk_group=3, group_score="max", norm_topk_prob=False), False),
]


@pytest.mark.parametrize("experts,top_k,options,bias", ROUTES)
@pytest.mark.parametrize("tokens", [1, 21])
def test_route_equals_reference(experts, top_k, options, bias, tokens):
    """The same experts in the same order, and the same weights bit for bit."""
    g = torch.Generator().manual_seed(experts + tokens)
    logits = torch.randn(tokens, experts, generator=g)
    if bias:  # negative biases: a dropped group must lose even to negative scores
        options = options | {"correction_bias": torch.randn(experts, generator=g) * 0.5 - 1.0}
    got, want = cpu.route(logits, top_k, **options), reference.route(logits, top_k, **options)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int32


@pytest.mark.parametrize("rows", [5, 300])  # the expert layout worked out on the host, and with tensor ops
def test_fused_moe_both_layouts_are_batch_invariant(rows):
    torch.manual_seed(4)
    e, h, i, k = 16, 64, 32, 4
    x = torch.randn(rows, h)
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    wts, ids = torch.rand(rows, k), torch.stack([torch.randperm(e)[:k] for _ in range(rows)]).to(torch.int32)
    together = cpu.fused_moe(x, w13, w2, wts, ids)
    torch.testing.assert_close(together, reference.fused_moe(x, w13, w2, wts, ids), rtol=1e-5, atol=1e-4)
    for row in (0, rows // 2, rows - 1):
        assert torch.equal(cpu.fused_moe(x[row : row + 1], w13, w2, wts[row : row + 1], ids[row : row + 1])[0],
                           together[row])


def test_products_run_in_fixed_row_calls_where_padded_calls_disagree(monkeypatch):
    """One call where the probe finds padded calls batch-invariant, else calls of exactly
    GEMM_ROW_MULTIPLE rows (along the given dim), their results in order."""
    seen: list[int] = []

    def double(part: torch.Tensor, dim: int = 0) -> torch.Tensor:
        seen.append(part.shape[dim])
        return part * 2

    x = torch.arange(36.0).view(12, 3)
    monkeypatch.setattr(cpu, "padded_products_are_invariant", lambda threads: True)
    assert torch.equal(cpu.invariant_rows(double, x), x * 2) and seen == [12]
    monkeypatch.setattr(cpu, "padded_products_are_invariant", lambda threads: False)
    seen.clear()
    assert torch.equal(cpu.invariant_rows(double, x), x * 2) and seen == [4, 4, 4]
    seen.clear()
    y = torch.arange(48.0).view(2, 8, 3)
    assert torch.equal(cpu.invariant_rows(lambda p: double(p, 1), y, dim=1), y * 2) and seen == [4, 4]

