"""Tenant limits: requests per second and tokens per minute, shared by every gateway through Redis.

Both limits are token buckets kept in one Redis hash per tenant and updated by one Lua script, so
admission is one atomic round trip whatever the number of gateway processes. A request costs one
request token at admission; its model tokens are only known at the end, so they are debited then
and the bucket may go below zero, which holds the tenant back until it refills. When Redis is
unreachable each gateway falls back to the same buckets kept in its own memory, and says so in
its metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gateway.config import Limit, LimitsConfig
from gateway.errors import GatewayError, Kind
from gateway.metrics import Metrics
from gateway.redis_link import RedisDown, RedisLink

# KEYS[1] the tenant's bucket hash. ARGV: rps, burst, tpm, request cost, token cost.
# Returns {admitted (0/1), retry_after_ms, requests left, tokens left} (the last two as strings: a
# Lua number would reach us truncated to an integer). Time comes from Redis so gateways need no
# shared clock.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rps, burst, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local req_cost, tok_cost = tonumber(ARGV[4]), tonumber(ARGV[5])
local b = redis.call('HMGET', KEYS[1], 'r', 'k', 'ts')
local ts = tonumber(b[3]) or now
local elapsed = math.max(0, now - ts)
local r = burst
if b[1] then r = math.min(burst, tonumber(b[1]) + elapsed * rps / 1000) end
local k = tpm
if b[2] then k = math.min(tpm, tonumber(b[2]) + elapsed * tpm / 60000) end
local ok = 1
local wait = 0
if req_cost > 0 then
  if rps > 0 and r < req_cost then ok = 0; wait = math.max(wait, (req_cost - r) * 1000 / rps) end
  if tpm > 0 and k <= 0 then ok = 0; wait = math.max(wait, (1 - k) * 60000 / tpm) end
end
if ok == 1 then r = r - req_cost; k = k - tok_cost end
redis.call('HSET', KEYS[1], 'r', r, 'k', k, 'ts', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return {ok, math.ceil(wait), tostring(r), tostring(k)}
"""


@dataclass(frozen=True)
class Quota:
    """What a tenant's buckets hold after an admission, sent back as OpenAI's x-ratelimit-* headers:
    the bucket sizes (the burst of requests, the minute's tokens), what is left of them, and how
    long until each is full again."""

    limit: Limit
    requests_left: float
    tokens_left: float

    def headers(self) -> dict[str, str]:
        rps, burst, tpm = _rates(self.limit)
        out: dict[str, str] = {}
        if rps > 0:
            left = max(0.0, self.requests_left)
            out |= {"x-ratelimit-limit-requests": str(int(burst)),
                    "x-ratelimit-remaining-requests": str(math.floor(left)),
                    "x-ratelimit-reset-requests": _duration((burst - left) / rps)}
        if tpm > 0:
            out |= {"x-ratelimit-limit-tokens": str(int(tpm)),
                    "x-ratelimit-remaining-tokens": str(max(0, math.floor(self.tokens_left))),
                    "x-ratelimit-reset-tokens": _duration((tpm - self.tokens_left) * 60.0 / tpm)}
        return out


def _duration(seconds: float) -> str:
    """OpenAI's way of writing a reset time: "0s", "1.5s", "6m0s"."""
    seconds = round(max(0.0, seconds), 3)
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass
class Bucket:
    """The same buckets as the Lua script, in memory, for when Redis is down."""

    requests: float
    tokens: float
    ts: float

    def take(self, limit: Limit, req_cost: float, tok_cost: float, now: float) -> tuple[bool, float, float, float]:
        rps, burst, tpm = _rates(limit)
        elapsed = max(0.0, now - self.ts)
        self.requests = min(burst, self.requests + elapsed * rps) if rps > 0 else burst
        self.tokens = min(tpm, self.tokens + elapsed * tpm / 60.0) if tpm > 0 else tpm
        self.ts = now
        wait = 0.0
        if req_cost > 0:
            if rps > 0 and self.requests < req_cost:
                wait = max(wait, (req_cost - self.requests) / rps)
            if tpm > 0 and self.tokens <= 0:
                wait = max(wait, (1 - self.tokens) * 60.0 / tpm)
        if wait > 0:
            return False, wait, self.requests, self.tokens
        self.requests -= req_cost
        self.tokens -= tok_cost
        return True, 0.0, self.requests, self.tokens


def _rates(limit: Limit) -> tuple[float, float, float]:
    rps = limit.requests_per_second
    burst = limit.burst or max(1.0, math.ceil(rps))
    return rps, float(burst), float(limit.tokens_per_minute)


class RateLimiter:
    """Admits or refuses a tenant's request; debits the tokens it used."""

    def __init__(self, link: RedisLink | None, config: LimitsConfig, metrics: Metrics) -> None:
        self._link = link
        self._config = config
        self._metrics = metrics
        self._local: dict[str, Bucket] = {}
        # EVALSHA with a reload on NOSCRIPT: the script text crosses the wire once.
        self._script = link.client.script(_SCRIPT) if link is not None else None

    def limited(self, tenant: str) -> bool:
        """Whether this tenant has any limit at all (most calls then skip Redis entirely)."""
        limit = self._config.for_tenant(tenant)
        return limit.requests_per_second > 0 or limit.tokens_per_minute > 0

    async def admit(self, tenant: str) -> Quota | None:
        """What is left of the tenant's limits (None: it has none); 429 with Retry-After, and the
        same x-ratelimit-* headers, when it is over one."""
        if not self.limited(tenant):
            return None
        ok, wait, quota = await self._take(tenant, 1, 0)
        if not ok:
            self._metrics.rate_limited.inc(tenant, "tenant")
            seconds = max(1, math.ceil(wait))
            raise GatewayError(
                Kind.RATE_LIMITED,
                f"rate limit reached for tenant {tenant!r}; retry after {seconds}s",
                code="rate_limit_exceeded",
                headers={"retry-after": str(seconds), **quota.headers()},
            )
        return quota

    async def debit(self, tenant: str, tokens: int) -> None:
        """Charge the model tokens a finished request used."""
        if tokens > 0 and self._config.for_tenant(tenant).tokens_per_minute > 0:
            await self._take(tenant, 0, tokens)

    async def _take(self, tenant: str, req_cost: int, tok_cost: int) -> tuple[bool, float, Quota]:
        """(admitted, seconds to wait, what is left) after taking the costs from the buckets."""
        limit = self._config.for_tenant(tenant)
        rps, burst, tpm = _rates(limit)
        if self._link is not None:
            try:
                ok, wait_ms, requests, tokens = await self._link.run(
                    lambda r: self._script(keys=[f"mrd:rl:{tenant}"], args=[rps, burst, tpm, req_cost, tok_cost])
                )
                self._metrics.limiter_fallback.set(value=0)
                return bool(ok), wait_ms / 1000.0, Quota(limit, float(requests), float(tokens))
            except RedisDown:
                self._metrics.limiter_fallback.set(value=1)
        bucket = self._local.get(tenant)
        if bucket is None:
            bucket = self._local[tenant] = Bucket(burst, tpm, time.monotonic())
        ok, wait, requests, tokens = bucket.take(limit, req_cost, tok_cost, time.monotonic())
        return ok, wait, Quota(limit, requests, tokens)
