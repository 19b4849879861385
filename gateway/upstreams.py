"""One small interface for an upstream, implemented for the edge (grpclib) and the core (Triton).

Routing and failover see only `Upstream`, so they treat edge and core alike and can be tested with
an in-process upstream. `UpstreamPool` holds every zone's upstreams and their health.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gateway.config import RoutingConfig, Tier
from gateway.outliers import EjectionPolicy, Outlier

log = logging.getLogger("meridian.gateway.health")


@dataclass(frozen=True, slots=True)
class EmbedResult:
    vectors: np.ndarray | list[list[float]]  # one row per input
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateCall:
    model: str
    prompt: str = ""
    # Chat requests send messages; the upstream (core or edge) applies the model's chat template.
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    # max_tokens is a ceiling: shortened to the room the prompt leaves in the context, not refused.
    fit_context: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    # Tokens another zone already sent to the client: generation resumes after them.
    prefix_token_ids: tuple[int, ...] = ()
    traceparent: str | None = None
    # Chosen by the canary weights; empty means the upstream's default version.
    model_version: str = ""


@dataclass(slots=True)
class GenerateChunk:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Upstream(Protocol):
    """A zone's edge worker or core, as the gateway talks to it."""

    zone: str
    tier: Tier

    @property
    def serving_replicas(self) -> int:
        """The serving replicas behind it (a zone's edge may be several workers): its capacity scales with them."""
        ...

    @property
    def replica_moves(self) -> int:
        """How many requests and streams it sent on to another of its replicas (a lost one's)."""
        ...

    @property
    def replica_ejections(self) -> int:
        """How many times one of its replicas was ejected as an outlier (its requests stalled)."""
        ...

    async def embed(
        self, model: str, inputs: list[str], *, timeout: float, traceparent: str | None = None
    ) -> EmbedResult: ...

    def generate(self, call: GenerateCall, *, timeout: float) -> AsyncIterator[GenerateChunk]: ...

    async def health(self, *, timeout: float) -> bool: ...

    async def close(self) -> None: ...


class Endpoint:
    """An upstream with what the gateway knows of it: health, ejection, latency and load."""

    def __init__(self, upstream: Upstream, config: RoutingConfig) -> None:
        self.upstream = upstream
        self._config = config
        self.healthy = False
        self.last_checked = 0.0
        self.in_flight = 0
        self.outlier = Outlier()
        self._policy = EjectionPolicy.of(config)
        self.rtt = PeakEwma(config.rtt_decay_s)

    @property
    def zone(self) -> str:
        return self.upstream.zone

    @property
    def tier(self) -> Tier:
        return self.upstream.tier

    def available(self, now: float | None = None) -> bool:
        """Healthy by the last probe and not ejected by outlier detection."""
        return self.healthy and not self.outlier.ejected(now if now is not None else time.monotonic())

    def probe_timeout(self) -> float:
        """How long the next health check waits: 4x the round trip while healthy (at least the
        configured minimum), the whole probe_timeout_s otherwise."""
        cfg = self._config
        if not self.healthy or not self.rtt.value:
            return cfg.probe_timeout_s
        return min(cfg.probe_timeout_s, max(cfg.probe_timeout_min_s, 4 * self.rtt.value))

    def saturated(self) -> bool:
        """Past its share of the traffic: later zones take the spill-over first."""
        return self.in_flight >= self._config.zone_capacity * max(1, self.upstream.serving_replicas)

    def full(self) -> bool:
        """At the circuit breaker's limit of requests in flight: it takes no more until some end."""
        limit = self._config.max_requests_per_replica
        return bool(limit) and self.in_flight >= limit * max(1, self.upstream.serving_replicas)

    def record_success(self) -> None:
        """A call answered: the failure streak ends."""
        self.outlier.record_success()

    def record_failure(self, *, hard: bool) -> bool:
        """A call failed; returns True when this ejected the endpoint.

        A hard failure (connection refused or reset) means the process is gone: out at once. Timeouts
        and errors eject after `consecutive_failures`, for an interval that doubles each time.
        """
        if hard:
            self.healthy = False
        return self.outlier.record_failure(self._policy, time.monotonic(), at_once=hard)

    def record_probe(self, ok: bool, rtt_s: float, now: float) -> None:
        """An active health check's answer; a change of state is logged."""
        first = not self.last_checked
        if (ok != self.healthy and not first) or (first and not ok):
            log.warning("endpoint healthy" if ok else "endpoint failed its health check",
                        extra={"zone": self.zone, "tier": self.tier})
        self.healthy = ok
        self.last_checked = now
        if ok:
            self.rtt.observe(rtt_s, now)


class PeakEwma:
    """A latency estimate that jumps up at once and decays with time constant `tau` (Finagle's peak EWMA)."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.value = 0.0
        self._at = 0.0

    def observe(self, sample: float, now: float) -> None:
        if sample > self.value:
            self.value = sample
        else:
            w = math.exp(-(now - self._at) / self.tau) if self._at else 0.0
            self.value = self.value * w + sample * (1 - w)
        self._at = now


class UpstreamPool:
    """Every zone's upstreams, kept fresh by an active health check."""

    def __init__(self, upstreams: list[Upstream], config: RoutingConfig | None = None) -> None:
        self.config = config or RoutingConfig()
        self.endpoints = [Endpoint(u, self.config) for u in upstreams]
        self._tasks: list[asyncio.Task] = []

    def for_tier(self, tier: Tier) -> list[Endpoint]:
        """The endpoints serving `tier`, in topology order."""
        return [e for e in self.endpoints if e.tier == tier]

    def all_healthy(self) -> bool:
        """Readiness: every endpoint answered its last health check."""
        return bool(self.endpoints) and all(e.healthy for e in self.endpoints)

    async def check_once(self) -> None:
        """Probe every endpoint concurrently and record the answers."""
        await asyncio.gather(*(self._probe(e) for e in self.endpoints))

    async def _probe(self, endpoint: Endpoint) -> None:
        started, timeout = time.monotonic(), endpoint.probe_timeout()
        try:
            ok = await asyncio.wait_for(endpoint.upstream.health(timeout=timeout), timeout)
        except Exception:  # noqa: BLE001 - a probe that fails in any way says "not healthy"
            ok = False
        except asyncio.CancelledError:
            # A client library's own CancelledError (grpc.aio raises one for a call cancelled under
            # it, as a closing channel does) is a failed probe too: only the check loop's own
            # cancellation may end the loop, which would otherwise freeze the endpoint's health.
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise
            ok = False
        now = time.monotonic()
        endpoint.record_probe(ok is True, now - started, now)

    def start(self) -> None:
        """Run each endpoint's health check in the background, each on its own clock.

        One loop per endpoint: a silent zone's probes, waiting out their timeout, must not delay
        the next look at the others (a returning zone, the zone taking the load). Once: a second
        call leaves the running checks as they are.
        """
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(e)) for e in self.endpoints]
        for task, endpoint in zip(self._tasks, self.endpoints, strict=True):
            task.add_done_callback(functools.partial(_watch_ended, endpoint))

    async def _watch(self, endpoint: Endpoint) -> None:
        # A probe every interval, start to start: a silent endpoint is seen down at most
        # probe_interval_s + its probe timeout after it fell silent.
        while True:
            started = time.monotonic()
            await self._probe(endpoint)
            await asyncio.sleep(max(0.0, self.config.probe_interval_s - (time.monotonic() - started)))

    async def close(self) -> None:
        """Stop checking and close every upstream's connections."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(e.upstream.close() for e in self.endpoints), return_exceptions=True)


def _watch_ended(endpoint: Endpoint, task: asyncio.Task) -> None:
    """A health-check loop ends only when the pool closes; any other end freezes the endpoint's
    health at its last answer, so it must not pass in silence."""
    if not task.cancelled():
        log.error("health checks stopped", exc_info=task.exception(),
                  extra={"zone": endpoint.zone, "tier": endpoint.tier})
