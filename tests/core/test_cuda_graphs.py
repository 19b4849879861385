"""Decode steps through the graph runner: padded to bucket sizes on the scratch slot and read to
bucket key lengths, they give what the plain forward gives (on CPU bit for bit, the model being
batch-invariant), and the padding rows never touch a sequence's cache. On a GPU the captured
replay matches the same bucket run eagerly, fed the same tokens (to bf16 rounding: the MoE down
kernel sums its top-k contributions with fp32 atomics, whose order differs from run to run)."""

from __future__ import annotations

import pytest
import torch

from core.engine.cuda_graphs import DecodeGraphs, batch_buckets, length_buckets
from core.engine.kv_cache import PagedKVCache
from core.model.loader import load_model


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert length_buckets(1040) == [128, 256, 512, 1024, 1040]
    assert length_buckets(100) == [96]


def decode_both(model, device: str, capture: bool, steps: int = 6, feed: list[list[int]] | None = None):
    """Greedy decode of five sequences, through the runner and through the plain forward; `feed`
    gives the tokens of each step instead (another run's choices, so that both see the same inputs)."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 40, 1, 130, 17]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    caches = [PagedKVCache(model.cache_layout(), 128, 16, 8, 400, torch.float32 if device == "cpu" else torch.bfloat16,
                           device) for _ in range(2)]
    slots = [[c.allocate(300) for _ in prompts] for c in caches]
    for cache, s in zip(caches, slots):
        for slot, p in zip(s, prompts):
            if len(p) > 1:
                model(torch.tensor([p[:-1]], device=device), torch.tensor([0], device=device), cache,
                      torch.tensor([slot], device=device))
    graphs = DecodeGraphs(model, caches[0], max_batch=8, capture=capture)
    tokens, positions = [p[-1] for p in prompts], [len(p) - 1 for p in prompts]
    out = []
    for _ in range(steps):
        via = graphs(tokens, positions, slots[0])
        plain = model(torch.tensor(tokens, device=device)[:, None], torch.tensor(positions, device=device), caches[1],
                      torch.tensor(slots[1], device=device))[:, -1]
        out.append((via.clone(), plain))  # the runner's logits live until its next call
        tokens = via.argmax(-1).tolist() if feed is None else feed[len(out) - 1]
        positions = [p + 1 for p in positions]
    return out, caches, slots


@torch.inference_mode()
def test_bucketed_decode_equals_the_plain_forward(local_checkpoint):
    model = load_model(local_checkpoint)
    out, caches, slots = decode_both(model, "cpu", capture=False)
    for via, plain in out:
        assert via.shape == plain.shape and torch.equal(via, plain)
    # Each sequence's blocks hold the same entries; only the scratch block saw the padding rows.
    for a, b in zip(caches[0].pools, caches[1].pools):
        for slot_a, slot_b in zip(slots[0], slots[1]):
            blocks_a, blocks_b = caches[0].table[slot_a], caches[1].table[slot_b]
            assert torch.equal(a[0][blocks_a[blocks_a > 0]], b[0][blocks_b[blocks_b > 0]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.inference_mode()
def test_captured_replay_equals_the_same_bucket_eagerly(local_checkpoint):
    model = load_model(local_checkpoint, dtype="bf16", device="cuda")
    replayed, _, _ = decode_both(model, "cuda", capture=True)
    eager, _, _ = decode_both(model, "cuda", capture=False, feed=[via.argmax(-1).tolist() for via, _ in replayed])
    for (a, _), (b, _) in zip(replayed, eager):
        # A stale input buffer or a wrong slot would be off by whole units, not by rounding.
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.05)
    for via, plain in replayed:  # and close to the unpadded forward (another shape: other rounding)
        torch.testing.assert_close(via, plain, rtol=0.05, atol=0.05)
