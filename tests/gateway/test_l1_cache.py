"""The in-process L1: bounded in entries and bytes, least recently used out first, short-lived."""

from __future__ import annotations

from gateway.l1_cache import L1Cache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_at_the_shorter_of_their_ttl_and_the_cache_ttl():
    clock = Clock()
    l1: L1Cache[str] = L1Cache(entries=10, max_bytes=1000, ttl_s=5.0, clock=clock)
    l1.put("redis-has-2s-left", "a", 1, ttl_s=2.0)
    l1.put("redis-has-an-hour", "b", 1, ttl_s=3600.0)
    clock.now += 1.9
    assert (l1.get("redis-has-2s-left"), l1.get("redis-has-an-hour")) == ("a", "b")
    clock.now += 0.2
    assert l1.get("redis-has-2s-left") is None
    clock.now += 3.0
    assert l1.get("redis-has-an-hour") is None
    assert len(l1) == 0


def test_nothing_already_expired_is_kept():
    l1: L1Cache[str] = L1Cache(entries=10, max_bytes=1000, ttl_s=5.0, clock=Clock())
    l1.put("k", "v", 1, ttl_s=0.0)
    assert l1.get("k") is None and len(l1) == 0


def test_bounded_in_entries_least_recently_used_out_first():
    l1: L1Cache[str] = L1Cache(entries=2, max_bytes=1000, ttl_s=5.0, clock=Clock())
    l1.put("a", "1", 1, 5)
    l1.put("b", "2", 1, 5)
    assert l1.get("a") == "1"  # a is now the most recently used
    l1.put("c", "3", 1, 5)
    assert (l1.get("a"), l1.get("b"), l1.get("c")) == ("1", None, "3")


def test_bounded_in_bytes():
    l1: L1Cache[bytes] = L1Cache(entries=100, max_bytes=10, ttl_s=5.0, clock=Clock())
    l1.put("a", b"x" * 6, 6, 5)
    l1.put("b", b"y" * 6, 6, 5)
    assert l1.get("a") is None and l1.get("b") == b"y" * 6
    l1.put("huge", b"z" * 11, 11, 5)
    assert l1.get("huge") is None and l1.get("b") == b"y" * 6
    l1.put("b", b"w" * 4, 4, 5)  # replacing an entry frees its old size
    l1.put("c", b"v" * 6, 6, 5)
    assert (l1.get("b"), l1.get("c")) == (b"w" * 4, b"v" * 6)
