"""Router kernel against the reference: softmax top-k (Mixtral, Qwen3-MoE) and DeepSeek-V3's
sigmoid scoring with correction bias and group-limited top-k."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels import reference

router = importlib.import_module("kernels.router")


def by_id(weights, ids):
    """Rows sorted by expert id (the reference's order is unspecified)."""
    order = ids.long().argsort(-1)
    return weights.gather(-1, order), ids.long().gather(-1, order)


CASES = {
    "mixtral": dict(e=8, top_k=2, kw=dict(scoring="softmax")),
    "qwen3": dict(e=32, top_k=8, kw=dict(scoring="softmax", norm_topk_prob=True)),
    "v2lite": dict(e=64, top_k=6, kw=dict(scoring="softmax", norm_topk_prob=False)),
    "v3": dict(e=64, top_k=8, kw=dict(scoring="sigmoid", n_group=8, topk_group=4,
                                      routed_scaling_factor=2.5), bias=True),
    "v3_top1": dict(e=16, top_k=1, kw=dict(scoring="sigmoid", n_group=4, topk_group=2), bias=True),
    "odd_experts": dict(e=12, top_k=3, kw=dict(scoring="softmax")),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("t", [1, 19])
def test_route_matches_reference(name, t, device):
    case = CASES[name]
    logits = torch.randn(t, case["e"]).to(torch.bfloat16)
    kw = dict(case["kw"])
    if case.get("bias"):
        kw["correction_bias"] = torch.randn(case["e"]) * 0.1
    ref_w, ref_ids = by_id(*reference.route(logits, case["top_k"], **kw))
    dev_kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    w, ids = router.route(logits.to(device), case["top_k"], **dev_kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    w, ids = by_id(w.cpu(), ids.cpu())
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_dropped_groups_score_zero_like_hugging_face(device):
    """Negative biased scores in kept groups lose to 0.0 in dropped ones, as in transformers."""
    e, t = 16, 4
    logits = torch.randn(t, e)
    bias = torch.full((e,), -2.0)
    bias[:4] = 0.5  # group 0 wins; its 4 experts, then the 0.0 of dropped groups
    ref_w, ref_ids = by_id(*reference.route(logits, 6, scoring="sigmoid", n_group=4, topk_group=1,
                                            correction_bias=bias, norm_topk_prob=False))
    w, ids = by_id(*[a.cpu() for a in router.route(logits.to(device), 6, scoring="sigmoid", n_group=4,
                                                   topk_group=1, correction_bias=bias.to(device),
                                                   norm_topk_prob=False)])
    assert set(ids[0, :].tolist()) >= {0, 1, 2, 3}
    # which 0.0-scored experts fill the last two places is a tie (so no renormalization here)
    torch.testing.assert_close(w[:, :4], ref_w[:, :4], rtol=1e-5, atol=1e-6)
    assert torch.equal(ids[:, :4], ref_ids[:, :4])
