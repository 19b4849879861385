"""When to try a request again and how long to wait: jittered exponential backoff, Retry-After first."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

from mobile.errors import APIError, ConfigError, EarlyDataRejected, RateLimitError, ServerError, TransportError

# 502/503/504: the gateway could not reach a healthy zone or timed out; the request did not run
# to completion, so asking again later is the documented cure. 500 is a bug: retrying hides it.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff: attempt n waits uniform(0, min(max_delay, base * 2**n)) ("full jitter")."""

    max_attempts: int = 4
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    max_retry_after_s: float = 60.0  # a longer Retry-After fails at once rather than hang the app

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ConfigError("delays must not be negative")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempt counts from 0)."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** attempt))
        return (rng or random).uniform(0.0, cap)

    def delay(self, error: BaseException, attempt: int, *, replay_safe: bool,
              rng: random.Random | None = None) -> float | None:
        """Seconds to wait before trying again after `error`, or None when it must not be retried."""
        if attempt + 1 >= self.max_attempts:
            return None
        if isinstance(error, APIError):
            if error.status not in RETRY_STATUSES:
                return None
            if error.retry_after is not None:
                return None if error.retry_after > self.max_retry_after_s else error.retry_after
            return self.backoff(attempt, rng)
        if isinstance(error, EarlyDataRejected):
            return 0.0  # the server ignored the early data: send again now, in 1-RTT
        if isinstance(error, TransportError):
            # A request that may have reached the server runs again only if replaying it is safe.
            if error.sent and not replay_safe:
                return None
            return self.backoff(attempt, rng)
        return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


__all__ = ["RetryPolicy", "parse_retry_after", "RETRY_STATUSES", "RateLimitError", "ServerError"]
