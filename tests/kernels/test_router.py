"""Router kernel against the reference: softmax top-k (Mixtral, Qwen3-MoE), DeepSeek-V3's
sigmoid scoring with correction bias and group-limited top-k, and DeepSeek-V2's groups ranked by
their best expert."""

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
    "mixtral": {"e": 8, "top_k": 2, "kw": {"scoring": "softmax"}},
    "qwen3": {"e": 32, "top_k": 8, "kw": {"scoring": "softmax", "norm_topk_prob": True}},
    "v2lite": {"e": 64, "top_k": 6, "kw": {"scoring": "softmax", "norm_topk_prob": False}},
    "v3": {
        "e": 64,
        "top_k": 8,
        "kw": {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5},
        "bias": True,
    },
    "v3_top1": {
        "e": 16,
        "top_k": 1,
        "kw": {"scoring": "sigmoid", "n_group": 4, "topk_group": 2},
        "bias": True,
    },
    "odd_experts": {"e": 12, "top_k": 3, "kw": {"scoring": "softmax"}},
    # DeepSeek-V2's group_limited_greedy: softmax, groups ranked by their best expert, no renormalisation.
    "v2_groups": {
        "e": 32,
        "top_k": 6,
        "kw": {"scoring": "softmax", "n_group": 8, "topk_group": 3, "group_score": "max",
               "norm_topk_prob": False, "routed_scaling_factor": 16.0},
    },
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


def test_dropped_groups_never_win_over_negative_biased_scores(device):
    """As transformers 5 routes: dropped groups score -inf, so negative biased scores in kept groups win."""
    e, t = 16, 8
    logits = torch.randn(t, e)
    bias = torch.full((e,), -3.0)
    bias[:8] = -1.5  # groups 0 and 1 win on their (negative) sums; every biased score is below 0
    kw = dict(scoring="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    ref_w, ref_ids = by_id(*reference.route(logits, 4, correction_bias=bias, **kw))
    w, ids = by_id(*[a.cpu() for a in router.route(logits.to(device), 4, correction_bias=bias.to(device), **kw)])
    assert ids.max() < 8 and ref_ids.max() < 8
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
