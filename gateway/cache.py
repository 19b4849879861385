"""The L2 cache in Redis: tenant-scoped, deterministic requests only, single flight.

Key = hash of (tenant, model and version, route, canonical request body without the fields that
do not change the answer). A streamed answer is stored whole and replayed as a stream. Concurrent
identical misses are collapsed: in this process through a shared future, across gateway
processes through a short Redis lock that followers wait on. Redis down means bypass. An
in-process L1 (`gateway/l1_cache.py`) answers repeated hits without a Redis round trip, and a
miss costs two round trips: look up or lock (one script), then store and unlock (another).

The same machinery makes `Idempotency-Key` requests replay-safe: their entry is keyed by (tenant,
route, key) whatever the sampling, so a retried or 0-RTT-replayed request gets the first answer
instead of a second generation, and a concurrent duplicate waits for it (single flight).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field

import msgspec

from gateway.config import CacheConfig
from gateway.l1_cache import L1Cache
from gateway.redis_link import RedisDown, RedisLink

# Fields that change how an answer is delivered, not what it is.
_DELIVERY_FIELDS = ("stream", "stream_options", "user")
# The namespace's version: c3 leaves behind the edge chats that c2 cached from an empty prompt.
_PREFIX = "mrd:c3:"
_POLL_S = 0.005


class CachedAnswer(msgspec.Struct, array_like=True):
    """What is stored: a generation's text deltas and counts, or an embedding answer's bytes."""

    kind: str  # "generate" | "embed"
    zone: str
    tier: str
    deltas: list[str] = []
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    body: bytes = b""
    request: str = ""  # the request's own cache key: an idempotency key reused for another request is refused


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CachedAnswer)


def cacheable(temperature: float, seed: int | None) -> bool:
    """Only answers that would come out the same again are cached."""
    return temperature == 0.0 or seed is not None


def cache_key(tenant: str, model: str, version: str, route: str, body: msgspec.Struct) -> str:
    """The tenant-scoped key of a request."""
    data = msgspec.to_builtins(body)
    for name in _DELIVERY_FIELDS:
        data.pop(name, None)
    canonical = msgspec.json.encode(data, order="sorted")
    digest = hashlib.sha256(b"\0".join([tenant.encode(), model.encode(), version.encode(), route.encode(), canonical]))
    # The digest is a hash tag: an entry and its lock share a Redis Cluster slot (scripts touch both).
    return _PREFIX + "{" + digest.hexdigest() + "}"


def idempotency_key(tenant: str, route: str, key: str) -> str:
    """The tenant-scoped entry of an `Idempotency-Key` request."""
    digest = hashlib.sha256(b"\0".join([b"idempotency", tenant.encode(), route.encode(), key.encode()]))
    return _PREFIX + "{" + digest.hexdigest() + "}"


@dataclass
class Lease:
    """The right (and duty) to produce the answer for a key, then `store` and `release` it."""

    key: str
    token: str
    cache: L2Cache
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    released: bool = False
    request: str = ""  # stamped on the stored answer (CachedAnswer.request)

    async def store(self, answer: CachedAnswer) -> None:
        """Keep the answer and, when that worked, give up the lease in the same round trip."""
        await self.cache.store(self, msgspec.structs.replace(answer, request=self.request))

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        await self.cache.release(self)


class L2Cache:
    """Lookup, single flight and storage of answers."""

    def __init__(self, link: RedisLink | None, config: CacheConfig) -> None:
        self._link = link
        self._config = config
        self._local: dict[str, Lease] = {}
        self._lookup = link.client.script(_LOOKUP_OR_LOCK) if link is not None else None
        self._store = link.client.script(_STORE_AND_UNLOCK) if link is not None else None
        self._unlock = link.client.script(_UNLOCK) if link is not None else None
        self._l1: L1Cache[CachedAnswer] | None = (
            L1Cache(config.l1_entries, config.l1_max_bytes, config.l1_ttl_s) if config.l1_entries > 0 else None
        )

    @property
    def enabled(self) -> bool:
        return self._config.enabled and self._link is not None

    @property
    def reachable(self) -> bool:
        """Whether there is a Redis to keep entries in (idempotency keys need one, not the cache)."""
        return self._link is not None

    async def begin(self, key: str, request: str = "") -> CachedAnswer | Lease | None:
        """A hit, a Lease to produce the answer (a miss), or None to bypass the cache. `request` is
        the request's own cache key, stamped on what the lease stores (CachedAnswer.request)."""
        deadline = time.monotonic() + self._config.wait_s
        try:
            while True:
                hit = self._l1.get(key) if self._l1 is not None else None
                if hit is not None:
                    return hit
                local = self._local.get(key)
                if local is not None:
                    # Someone here is looking it up or producing it: wait, then look again.
                    await asyncio.wait_for(asyncio.shield(local.done), max(0.0, deadline - time.monotonic()))
                    continue
                got = await self._begin_here(key, request, deadline)
                if got is not None:
                    return got
        except (RedisDown, asyncio.TimeoutError):
            return None

    async def _begin_here(self, key: str, request: str, deadline: float) -> CachedAnswer | Lease | None:
        """Look the key up in Redis and take its lock if it is missing; None to look again."""
        lease = Lease(key, secrets.token_hex(8), self, request=request)
        self._local[key] = lease
        try:
            hit, locked = await self._lookup_or_lock(lease)
            if locked:
                return lease
            if hit is None:
                # Another gateway process is producing it.
                hit = await self._wait_remote(key, deadline)
                if hit is None and time.monotonic() >= deadline:
                    return lease
        except BaseException:
            self._finish_local(lease)
            raise
        self._finish_local(lease)
        return hit

    async def _lookup_or_lock(self, lease: Lease) -> tuple[CachedAnswer | None, bool]:
        """(the stored answer, False), or (None, whether we now hold the key's lock): one round trip."""
        lock_ms = int(self._config.wait_s * 1000)
        raw, n = await self._link.run(lambda r: self._lookup(keys=[lease.key, _lock_key(lease.key)],
                                                              args=[lease.token, lock_ms]))
        if raw is None:
            return None, n == 1
        hit = _decode(raw)
        if hit is None:
            return None, True  # unreadable: produce it again, the store overwrites it
        if self._l1 is not None and n != -2:
            # The entry's remaining life in Redis (n, ms) came with it: the L1 copy must not outlive it.
            self._l1.put(lease.key, hit, len(raw), self._l1.ttl_s if n == -1 else n / 1000)
        return hit, False

    async def _wait_remote(self, key: str, deadline: float) -> CachedAnswer | None:
        """Poll until the other producer stored the answer or gave up its lock."""
        lock = _lock_key(key)
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
            raw, locked = await self._link.run(lambda r: r.get_and_exists(key, lock))
            if raw is not None:
                return _decode(raw)
            if not locked:
                return None
        return None

    async def store(self, lease: Lease, answer: CachedAnswer) -> None:
        """Keep an answer for the configured TTL (unless over the size limit) and release the lease."""
        raw = _encoder.encode(answer)
        if len(raw) > self._config.max_entry_bytes:
            return
        ttl = self._config.ttl_s
        try:
            await self._link.run(lambda r: self._store(keys=[lease.key, _lock_key(lease.key)],
                                                       args=[raw, ttl, lease.token]))
        except RedisDown:
            return
        if self._l1 is not None:
            self._l1.put(lease.key, answer, len(raw), ttl)
        lease.released = True
        self._finish_local(lease)

    async def release(self, lease: Lease) -> None:
        """Drop the lock (only if still ours) and wake local followers."""
        self._finish_local(lease)
        try:
            await self._link.run(lambda r: self._unlock(keys=[_lock_key(lease.key)], args=[lease.token]))
        except RedisDown:
            pass

    def _finish_local(self, lease: Lease) -> None:
        if self._local.get(lease.key) is lease:
            del self._local[lease.key]
        if not lease.done.done():
            lease.done.set_result(None)


def _decode(raw: bytes | None) -> CachedAnswer | None:
    if raw is None:
        return None
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return None


_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# KEYS: entry, lock. ARGV: token, lock ms. {entry, its PTTL} when stored, else {nil, 1 if we took the lock}.
_LOOKUP_OR_LOCK = """
local v = redis.call('GET', KEYS[1])
if v then return {v, redis.call('PTTL', KEYS[1])} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end
return {false, 0}
"""
# KEYS: entry, lock. ARGV: answer, TTL s, token. Stores the answer, then drops the lock if still ours.
_STORE_AND_UNLOCK = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""


def _lock_key(key: str) -> str:
    return key + ":lock"

