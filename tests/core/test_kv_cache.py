"""The paged KV cache: budget, block accounting, and the same model outputs as the dense slot cache."""

from __future__ import annotations

import pytest
import torch

from core.engine.kv_cache import PagedKVCache, SlotKVCache, bytes_per_token
from core.model.loader import load_model

LAYOUT = [((8,), (4,))] * 3


def test_budget_sets_the_pool_size():
    per_token = bytes_per_token(LAYOUT, torch.float32)
    assert per_token == 3 * (8 + 4) * 4
    cache = PagedKVCache.from_budget(LAYOUT, budget_bytes=per_token * 16 * 10, block_size=16, max_slots=4,
                                     max_len=256, dtype=torch.float32)
    assert cache.num_blocks == 9  # one of the ten goes to the scratch block
    held = sum(t.numel() * t.element_size() for entry in cache.pools for t in entry)
    assert held <= per_token * 16 * 10


def test_blocks_are_taken_and_given_back():
    cache = PagedKVCache(LAYOUT, num_blocks=6, block_size=4, max_slots=3, max_len=64, dtype=torch.float32)
    assert cache.can_allocate(24) and not cache.can_allocate(25)
    a = cache.allocate(10)  # 3 blocks
    assert cache.free_blocks == 3 and not cache.can_allocate(13)
    b = cache.allocate(12)
    assert cache.free_blocks == 0 and not cache.can_allocate(1)
    with pytest.raises(RuntimeError, match="full"):
        cache.allocate(1)
    cache.release(a)
    assert cache.free_blocks == 3 and cache.can_allocate(12)
    cache.release(b)
    assert cache.free_blocks == 6 and cache.free_slots == 3


def write(cache, slots: list[int], start: list[int], new: torch.Tensor, kv_len: int):
    """One layer's update, as a forward makes it."""
    return cache.update(0, cache.plan(torch.tensor(slots), torch.tensor(start), new.shape[1], kv_len), (new,))


def test_padding_writes_never_reach_other_rows():
    """Padding lands in the scratch block only. Both batch orders, since within one write a later row's own
    data covers an earlier row's leak into its blocks; the pool is checked, not just what is read back."""
    new = torch.arange(1, 2 * 8 * 2 + 1, dtype=torch.float32).view(2, 8, 2)  # 8 positions: 4 past the blocks
    for order in ("ab", "ba"):
        cache = PagedKVCache([((2,),)], num_blocks=5, block_size=2, max_slots=2, max_len=16, dtype=torch.float32)
        slots = {"a": cache.allocate(4), "b": cache.allocate(4)}  # blocks 1-2 and 3-4; block 5 stays free
        (out,) = write(cache, [slots[r] for r in order], [0, 0], new, kv_len=8)
        assert torch.equal(out[:, :4], new[:, :4])
        pool = cache.pools[0][0]
        for row, name in enumerate(order):  # each row's blocks hold its own 4 tokens and nothing else
            assert torch.equal(pool[cache.table[slots[name], :2]].view(4, 2), new[row, :4])
        assert not pool[5].any()  # a free block is never written
        assert torch.isin(pool[0], new[:, 4:]).all()  # the padding went to the scratch block


@torch.no_grad()
def test_paged_equals_slot_cache(local_checkpoint):
    model = load_model(local_checkpoint)
    layout = model.cache_layout()
    paged = PagedKVCache(layout, num_blocks=40, block_size=16, max_slots=3, max_len=300, dtype=torch.float32)
    dense = SlotKVCache(layout, 3, 300, torch.float32)
    paged.allocate(50)  # a neighbour, so block ids and slots differ from the dense cache's
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ps = torch.tensor([paged.allocate(120), paged.allocate(120)])
    ds = torch.tensor([dense.allocate(), dense.allocate()])
    start = torch.zeros(2, dtype=torch.long)
    got, want = model(ids, start, paged, ps), model(ids, start, dense, ds)
    assert torch.equal(got, want)
    tokens = got[:, -1:].argmax(-1)
    for step in range(8):  # rows at different lengths: the second row restarts from position 10
        start = torch.tensor([40 + step, 10 + step])
        got, want = model(tokens, start, paged, ps), model(tokens, start, dense, ds)
        assert torch.equal(got, want)
        tokens = got[:, -1:].argmax(-1)


def test_a_slot_handed_on_gets_its_own_blocks():
    """A slot released and taken again writes to its new owner's blocks, never its old ones."""
    cache = PagedKVCache([((2,),)], num_blocks=4, block_size=2, max_slots=2, max_len=8, dtype=torch.float32)
    a, b = cache.allocate(2), cache.allocate(2)  # blocks 1 and 2
    first = torch.ones(1, 2, 2)
    write(cache, [b], [0], first, kv_len=2)
    cache.release(b)
    cache.release(a)
    c = cache.allocate(4)  # takes blocks 1 and 2
    d = cache.allocate(2)  # block 3, in b's slot
    assert d == b and cache.table[d, 0] == 3
    second = torch.full((1, 2, 2), 2.0)
    (out,) = write(cache, [d], [0], second, kv_len=2)  # same slots, start, length
    assert torch.equal(out, second)
    assert torch.equal(cache.pools[0][0][3], second[0])  # d's own block
    assert torch.equal(cache.pools[0][0][2], first[0])  # c's block untouched
    assert cache.table[c].tolist()[:2] == [1, 2]
