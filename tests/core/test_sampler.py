"""The sampler's distribution against transformers' logits warpers on fixed distributions."""

from __future__ import annotations

import pytest
import torch

from core.engine.sampler import SamplingParams, sample

transformers = pytest.importorskip("transformers")

DRAWS = 4000


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' sampling distribution: temperature, then top-k, then top-p, renormalised."""
    scores = logits[None].double() / temperature
    if top_k > 0:
        scores = transformers.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = transformers.TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores[0], -1)


def ours(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Our frequencies over DRAWS seeds (deterministic: seeds 0..DRAWS-1)."""
    counts = torch.zeros(logits.numel(), dtype=torch.float64)
    for seed in range(DRAWS):
        counts[sample(logits, SamplingParams(params.temperature, params.top_p, params.top_k, seed), 0)] += 1
    return counts / DRAWS


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (1.0, 2, 0.5),  # top_p within what top_k kept: only the first token stays (0.6 of the two)
    (1.0, 4, 0.7),
    (0.7, 0, 0.8),
    (1.3, 3, 1.0),
])
def test_frequencies_follow_the_transformers_warpers(temperature, top_k, top_p):
    # Distinct values: among equal ones, which survive a cut is arbitrary (and differs between the two).
    probs = torch.tensor([0.30, 0.20, 0.12, 0.10, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02])
    logits = probs.log().float()
    want = reference_probs(logits, temperature, top_k, top_p)
    got = ours(logits, SamplingParams(temperature, top_p, top_k, None))
    assert torch.equal(got > 0, want > 0), (got, want)  # the same tokens can be drawn
    assert (got - want).abs().max().item() < 0.03, (got, want)  # ~4 sigma at 4000 draws
