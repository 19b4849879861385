"""The L2 cache in Redis: tenant-scoped, deterministic requests only, single flight.

Key = hash of (tenant, model and version, route, canonical request body without the fields that
do not change the answer). A streamed answer is stored whole and replayed as a stream. Concurrent
identical misses are collapsed: in this process through a shared future, across gateway
processes through a short Redis lock that followers wait on. Redis down means bypass.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field

import msgspec

from gateway.config import CacheConfig
from gateway.redis_link import RedisDown, RedisLink

# Fields that change how an answer is delivered, not what it is.
_DELIVERY_FIELDS = ("stream", "stream_options", "user")
_PREFIX = "mrd:c1:"
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
    return _PREFIX + digest.hexdigest()


@dataclass
class Lease:
    """The right (and duty) to produce the answer for a key, then `store` and `release` it."""

    key: str
    token: str
    cache: L2Cache
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    released: bool = False

    async def store(self, answer: CachedAnswer) -> None:
        await self.cache.store(self.key, answer)

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
        self._unlock = link.client.script(_UNLOCK) if link is not None else None

    @property
    def enabled(self) -> bool:
        return self._config.enabled and self._link is not None

    async def begin(self, key: str) -> CachedAnswer | Lease | None:
        """A hit, a Lease to produce the answer (a miss), or None to bypass the cache."""
        try:
            hit = await self._get(key)
            if hit is not None:
                return hit
            deadline = time.monotonic() + self._config.wait_s
            while True:
                local = self._local.get(key)
                if local is not None:
                    # Someone here is producing it: wait, then look again.
                    await asyncio.wait_for(asyncio.shield(local.done), max(0.0, deadline - time.monotonic()))
                    hit = await self._get(key)
                    if hit is not None:
                        return hit
                    continue
                lease = Lease(key, secrets.token_hex(8), self)
                self._local[key] = lease
                if await self._lock(lease):
                    return lease
                # Another gateway process is producing it.
                hit = await self._wait_remote(key, deadline)
                if hit is not None:
                    self._finish_local(lease)
                    return hit
                if time.monotonic() >= deadline:
                    return lease
                self._finish_local(lease)
        except (RedisDown, asyncio.TimeoutError):
            return None

    async def _get(self, key: str) -> CachedAnswer | None:
        raw = await self._link.run(lambda r: r.get(key))
        if raw is None:
            return None
        try:
            return _decoder.decode(raw)
        except msgspec.DecodeError:
            return None

    async def _lock(self, lease: Lease) -> bool:
        ttl_ms = int(self._config.wait_s * 1000)
        return bool(await self._link.run(lambda r: r.set(_lock_key(lease.key), lease.token, nx=True, px=ttl_ms)))

    async def _wait_remote(self, key: str, deadline: float) -> CachedAnswer | None:
        """Poll until the other producer stored the answer or gave up its lock."""
        lock = _lock_key(key)
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
            raw, locked = await self._link.run(lambda r: r.get_and_exists(key, lock))
            if raw is not None:
                try:
                    return _decoder.decode(raw)
                except msgspec.DecodeError:
                    return None
            if not locked:
                return None
        return None

    async def store(self, key: str, answer: CachedAnswer) -> None:
        """Keep an answer for the configured TTL, unless it is over the size limit."""
        raw = _encoder.encode(answer)
        if len(raw) > self._config.max_entry_bytes:
            return
        try:
            await self._link.run(lambda r: r.set(key, raw, ex=self._config.ttl_s))
        except RedisDown:
            pass

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


_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _lock_key(key: str) -> str:
    return key + ":lock"

