"""Retrying in the next zone: unary calls (with hedging), and generation streams resumed.

A request moves to another zone only when nothing has reached the client yet, or when the engine
can resume it: a stream continues in the next zone from the prompt plus the tokens already sent,
with the same seed, so the client sees one unbroken stream. A zone of several replicas keeps
what one replica's trouble need not send away: the first hedge goes to another of its replicas,
and a stream whose replica was lost resumes in it. Retries and hedges draw on a budget (a
fraction of live traffic) so that a sick region cannot double the load on the healthy ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from gateway.aio import next_watched
from gateway.config import RoutingConfig
from gateway.errors import GatewayError, Kind, UpstreamFailure
from gateway.metrics import Metrics
from gateway.replicas import Placement, distinct_replicas, placed
from gateway.upstreams import Endpoint, GenerateCall, GenerateChunk

T = TypeVar("T")
log = logging.getLogger("meridian.gateway.failover")


class RetryBudget:
    """Retries allowed: `ratio` of requests, plus a floor of `min_per_s`, banked for 10 seconds."""

    def __init__(self, ratio: float, min_per_s: float, window_s: float = 10.0) -> None:
        self._ratio = ratio
        self._min_per_s = min_per_s
        self._floor = max(1.0, min_per_s * window_s)
        self._cap = 2 * self._floor
        self._tokens = self._floor
        self._at = time.monotonic()

    def on_request(self) -> None:
        """Every first try deposits its share."""
        self._tokens = min(self._cap, self._tokens + self._ratio)

    def try_spend(self) -> bool:
        """Take one retry if the budget allows it."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = time.monotonic()
        if self._tokens < self._floor:
            self._tokens = min(self._floor, self._tokens + (now - self._at) * self._min_per_s)
        self._at = now


class Failover:
    """Runs calls against ranked endpoints: timeouts, passive outlier detection, retries, hedges."""

    def __init__(self, config: RoutingConfig, metrics: Metrics, *, stream_timeout_s: float = 3600.0) -> None:
        self.config = config
        self.metrics = metrics
        self.stream_timeout_s = stream_timeout_s
        self.budget = RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s)

    def failed(self, endpoint: Endpoint, failure: UpstreamFailure) -> None:
        """Record a failed call against its endpoint (ejecting it when that is due)."""
        self.metrics.upstream_errors.inc(endpoint.zone, endpoint.tier)
        if endpoint.record_failure(hard=failure.hard):
            self.metrics.ejections.inc(endpoint.zone, endpoint.tier)
            log.warning("endpoint ejected", extra={"zone": endpoint.zone, "tier": endpoint.tier, "error": str(failure)})

    async def unary(
        self, endpoints: list[Endpoint], call: Callable[[Endpoint], Awaitable[T]], *, hedge: bool = False
    ) -> tuple[Endpoint, T, int]:
        """(endpoint, the first successful answer, tries made). An idempotent call (`hedge`) still
        unanswered after `hedge_after_s` is sent again: first to another replica of its zone, while
        the zone has one serving, then to the next zone."""
        queue = self._admit(endpoints)
        self.budget.on_request()
        running: dict[asyncio.Task, Endpoint] = {}
        launched: dict[asyncio.Task, int] = {}  # each try's place in launch order
        where: dict[asyncio.Task, Placement] = {}  # each try's replica
        last: UpstreamFailure | None = None
        first = queue[0]
        hedged_in_zone = False

        def launch(endpoint: Endpoint) -> None:
            placement = Placement()
            task = asyncio.ensure_future(self._try(endpoint, call, placement))
            running[task], launched[task], where[task] = endpoint, len(launched), placement

        def hedge_target() -> Endpoint | None:
            if not hedge or self.config.hedge_after_s <= 0:
                return None
            if not hedged_in_zone and first.upstream.serving_replicas > 1 and first in running.values():
                return first
            return queue[0] if queue else None

        # The tries of this request go to different replicas (a hedge within the zone included).
        with distinct_replicas():
            launch(queue.pop(0))
            try:
                while running:
                    target = hedge_target()
                    done, _ = await asyncio.wait(
                        running, timeout=self.config.hedge_after_s if target else None,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not done:
                        if not self.budget.try_spend():
                            hedge = False
                        elif target is first and not hedged_in_zone:
                            hedged_in_zone = True
                            self.metrics.retries.inc("hedge_in_zone")
                            launch(first)
                        else:
                            self.metrics.retries.inc("hedge")
                            launch(queue.pop(0))
                        continue
                    for task in done:
                        endpoint = running.pop(task)
                        try:
                            result = task.result()
                        except UpstreamFailure as failure:
                            last = failure
                            if not failure.retryable:
                                raise GatewayError(Kind.UPSTREAM, str(failure)) from failure
                            self.failed(endpoint, failure)
                            continue
                        endpoint.record_success()
                        self._charge_beaten(running, launched, where, task, endpoint)
                        return endpoint, result, len(launched)
                    if not running and queue and self.budget.try_spend():
                        self.metrics.retries.inc(queue[0].tier)
                        launch(queue.pop(0))
            finally:
                for task in running:
                    task.cancel()
        raise _exhausted(last)

    def _charge_beaten(
        self, running: dict[asyncio.Task, Endpoint], launched: dict[asyncio.Task, int],
        where: dict[asyncio.Task, Placement], winner: asyncio.Task, zone: Endpoint,
    ) -> None:
        """Tries beaten by a hedge sent after them count towards ejection, as timeouts: their
        replicas' each, and their endpoints' once per endpoint. A hedge beaten by the try it backed
        up merely started later; a try beaten within its own zone is its replica's failure, not the zone's."""
        charged = {zone}
        for task, slower in running.items():
            if launched[task] >= launched[winner]:
                continue
            where[task].slow()
            if slower not in charged:
                charged.add(slower)
                self.failed(slower, UpstreamFailure(f"{slower.tier} in {slower.zone} lost to a hedge", timeout=True))

    async def _try(self, endpoint: Endpoint, call: Callable[[Endpoint], Awaitable[T]], placement: Placement) -> T:
        endpoint.in_flight += 1
        try:
            with placed(placement):
                return await asyncio.wait_for(call(endpoint), self.config.try_timeout_s)
        except asyncio.TimeoutError:
            placement.slow()
            raise UpstreamFailure(f"{endpoint.tier} in {endpoint.zone} timed out", timeout=True) from None
        finally:
            endpoint.in_flight -= 1

    def stream(self, endpoints: list[Endpoint], call: GenerateCall) -> ResumableStream:
        """A generation stream that survives the loss of a zone."""
        queue = self._admit(endpoints)
        self.budget.on_request()
        return ResumableStream(self, queue, call)

    def _admit(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """The usable endpoints with room for one more request (the circuit breaker); with every
        one of them full, a 503 at once: queueing behind them would only grow every caller's wait."""
        usable = _usable(endpoints)
        room = [e for e in usable if not e.full()]
        if not room:
            tier = usable[0].tier
            self.metrics.overflow.inc(tier)
            raise GatewayError(Kind.OVERLOADED, f"every zone serving this {tier} model is at its limit of requests "
                               "in flight; retry shortly", code="overloaded", headers={"retry-after": "1"})
        return room


class ResumableStream:
    """A generation stream that survives the loss of a zone.

    `first_zone` is known once `start()` returned, before any chunk reaches the client.
    """

    def __init__(self, failover: Failover, queue: list[Endpoint], call: GenerateCall) -> None:
        self._failover = failover
        self._queue = queue
        self._call = call
        self._tokens: list[int] = []
        self._first: GenerateChunk | None = None
        self._current: AsyncIterator[GenerateChunk] | None = None
        self._endpoint: Endpoint | None = None
        self._watch = True
        self._replicas: set = set()  # the replicas its tries used (gateway/replicas.py)
        self._placement = Placement()  # the current try's replica
        self._stalled_zones: set[str] = set()
        self.first_zone: str = ""
        self.resumed = 0
        self.tries = 0  # endpoints asked so far, resumes included

    async def start(self) -> None:
        """Open the stream in the first zone that yields a chunk."""
        self._first = await self._open(first=True)

    async def _open(self, *, first: bool) -> GenerateChunk:
        cfg = self._failover.config
        last: UpstreamFailure | None = None
        attempt = 0
        while self._queue:
            if attempt and not self._failover.budget.try_spend():
                break
            attempt += 1
            self.tries += 1
            endpoint = self._queue.pop(0)
            call = self._call
            if self._tokens:
                # The same request, resumed: max_tokens stays the whole budget, prefix included.
                call = dataclasses.replace(call, prefix_token_ids=call.prefix_token_ids + tuple(self._tokens))
            # Panic routing tries endpoints that fail their probes: only a change for the worse
            # while streaming may then end the stream, not the state it was opened in.
            watch = endpoint.available()
            stream = endpoint.upstream.generate(call, timeout=self._failover.stream_timeout_s)
            endpoint.in_flight += 1
            placement = Placement()
            try:
                # The replica is picked with the first chunk.
                with distinct_replicas(self._replicas), placed(placement):
                    chunk = await self._next(stream, cfg.first_chunk_timeout_s, endpoint, watch)
            except UpstreamFailure as failure:
                endpoint.in_flight -= 1
                if failure.stalled:
                    placement.slow()
                await _close_quietly(stream)
                if not failure.retryable:
                    raise GatewayError(Kind.UPSTREAM, str(failure)) from failure
                last = failure
                self._failover.failed(endpoint, failure)
                continue
            except BaseException:  # cancelled (the client left) or timed out: give the slot back
                endpoint.in_flight -= 1
                await _close_quietly(stream)
                raise
            if attempt > 1 or not first:
                self._failover.metrics.retries.inc(endpoint.tier)
            self._current, self._endpoint, self._watch, self._placement = stream, endpoint, watch, placement
            self.first_zone = self.first_zone or endpoint.zone
            return chunk
        raise _exhausted(last)

    @staticmethod
    async def _next(
        stream: AsyncIterator[GenerateChunk], timeout: float, endpoint: Endpoint, watch: bool
    ) -> GenerateChunk:
        """The next chunk; a stall, or (`watch`) the endpoint going down meanwhile, is a failure
        (a blackholed zone keeps its connection open and silent: `next_watched`)."""

        def down() -> UpstreamFailure | None:
            if watch and not endpoint.available():
                return UpstreamFailure(f"{endpoint.tier} in {endpoint.zone} went down mid-stream", timeout=True)
            return None

        try:
            return await next_watched(stream, down, timeout=timeout)
        except StopAsyncIteration:
            raise UpstreamFailure("stream ended without a finish reason") from None
        except TimeoutError:
            raise UpstreamFailure(f"{endpoint.tier} in {endpoint.zone} stalled", timeout=True, stalled=True) from None

    async def chunks(self) -> AsyncIterator[GenerateChunk]:
        """Every chunk of the generation; a failed zone hands over to the next mid-stream."""
        chunk = self._first
        assert chunk is not None, "start() first"
        gap = self._failover.config.chunk_gap_timeout_s
        while True:
            self._tokens.extend(chunk.token_ids)
            yield chunk
            if chunk.finish_reason:
                self._endpoint.record_success()
                self._placement.answered()
                return
            try:
                chunk = await self._next(self._current, gap, self._endpoint, self._watch)
            except UpstreamFailure as failure:
                if not failure.retryable:
                    raise GatewayError(Kind.UPSTREAM, str(failure)) from failure
                failed = self._endpoint
                stays = self._stays_in_zone(failure, failed)
                if failure.stalled:  # after the count of serving replicas that decided where to go
                    self._placement.slow()
                if stays:
                    # One replica went away or stalled; its zone serves on the others: go on there, uncharged.
                    log.warning("resuming stream in the same zone", extra={"zone": failed.zone, "error": str(failure)})
                    self._queue.insert(0, failed)
                else:
                    log.warning("resuming stream in the next zone", extra={"zone": failed.zone, "error": str(failure)})
                    self._failover.failed(failed, failure)
                await self._release()
                self.resumed += 1
                self._failover.metrics.resumed.inc(failed.tier)
                chunk = await self._open(first=False)

    def _stays_in_zone(self, failure: UpstreamFailure, endpoint: Endpoint) -> bool:
        """Whether a stream broken mid-way resumes in its own zone: one of its replicas was lost
        while others serve (the replica set says so), or it stalled for the first time there while
        another replica serves (which the resume goes to, `distinct_replicas`). A second stall in
        that zone is the zone's, and the stream moves on."""
        if not endpoint.available():
            return False
        if failure.in_zone:
            return True
        if failure.stalled and endpoint.upstream.serving_replicas > 1 and endpoint.zone not in self._stalled_zones:
            self._stalled_zones.add(endpoint.zone)
            return True
        return False

    async def _release(self) -> None:
        """Close the current upstream stream and give its endpoint's slot back, once."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.in_flight -= 1
        current, self._current = self._current, None
        if current is not None:
            await _close_quietly(current)

    async def aclose(self) -> None:
        """Close the upstream stream (cancels the generation when the client went away)."""
        await self._release()


async def _close_quietly(stream: AsyncIterator) -> None:
    try:
        await stream.aclose()
    except Exception:  # noqa: BLE001 - closing a broken stream may raise; nothing to do about it
        pass


def _usable(endpoints: list[Endpoint]) -> list[Endpoint]:
    """The available endpoints; when none is, every endpoint (panic routing).

    Health checks can all fail at once without every zone being down, e.g. when a starved
    machine answers its probes late. Refusing everything then would turn a blip into an outage;
    trying the endpoints anyway costs at worst a fast failure each (Envoy's panic threshold).
    """
    now = time.monotonic()
    usable = [e for e in endpoints if e.available(now)]
    if usable:
        return usable
    if not endpoints:
        raise GatewayError(Kind.NO_HEALTHY_ZONE, "no zone serves this model", code="no_healthy_zone")
    log.warning("no endpoint passes its health checks: trying them all", extra={"tier": endpoints[0].tier})
    return list(endpoints)


def _exhausted(last: UpstreamFailure | None) -> GatewayError:
    if last is not None and last.timeout:
        return GatewayError(Kind.UPSTREAM_TIMEOUT, f"every zone timed out ({last})", code="upstream_timeout")
    reason = f" ({last})" if last is not None else ""  # None: no zone was left to try
    return GatewayError(Kind.NO_HEALTHY_ZONE, f"every zone failed{reason}", code="upstream_unavailable")
