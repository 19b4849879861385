"""Next-token choice: greedy, or temperature / top-k / top-p sampling with per-request seeds.

A sampled step's randomness is one uniform number drawn from (seed, step index) alone, so a request
gives the same tokens whatever it is batched with, and a stream resumed after n tokens draws what
the uninterrupted run drew at step n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens; temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash: nearby (seed, step) pairs give unrelated streams."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_uniform(seed: int, step: int) -> float:
    """The uniform number in [0, 1) that decides sampled step `step` of a request seeded `seed`."""
    g = torch.Generator().manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 1)
    return torch.rand((), generator=g, dtype=torch.float64).item()


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """Pick the next token from fp32 logits [V] for step `step` of a request."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    probs, order = probs.sort(descending=True, stable=True)
    if params.top_k > 0:
        probs = probs[: params.top_k]
        probs = probs / probs.sum()  # top_p applies to what top_k kept, as in transformers and vLLM
    if params.top_p < 1.0:
        before = probs.cumsum(0) - probs  # mass ahead of each token: keep it while below top_p
        probs = probs[before < params.top_p]
    cdf = probs.cumsum(0)
    u = step_uniform(params.seed, step) * cdf[-1].item()
    index = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)), len(cdf) - 1)
    return int(order[index])
