"""Next-token choice for the small LM: greedy, or temperature / top-p sampling with a seed.

A sampled step's randomness is one uniform number drawn from (seed, step index) alone, so a stream
resumed after n tokens (in another zone, on another worker) draws what the uninterrupted run drew
at step n. numpy only: the mobile SDK runs this without torch.
"""

from __future__ import annotations

import secrets

import numpy as np

_MASK64 = (1 << 64) - 1
GREEDY_BELOW = 1e-5  # temperatures this small mean greedy (a softmax at T ~ 0 overflows anyway)


def splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash: nearby (seed, step) pairs give unrelated numbers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_uniform(seed: int, step: int) -> float:
    """The uniform number in [0, 1) that decides sampled step `step` of a request seeded `seed`."""
    return (splitmix64(splitmix64(seed & _MASK64) ^ step) >> 11) * 2.0**-53


def random_seed() -> int:
    """A seed for a request that gave none (its tokens are then not reproducible, as asked)."""
    return secrets.randbits(64)


def pick_token(logits: np.ndarray, temperature: float, top_p: float, seed: int, step: int) -> int:
    """The next token from logits [V] for step `step` of a request."""
    if temperature <= GREEDY_BELOW:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    probs = probs[order]
    if top_p < 1.0:
        before = np.cumsum(probs) - probs  # mass ahead of each token: keep it while below top_p
        keep = max(1, int((before < top_p).sum()))
        probs = probs[:keep]
    cdf = np.cumsum(probs)
    u = step_uniform(seed, step) * cdf[-1]
    index = min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)
    return int(order[index])
