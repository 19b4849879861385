"""A zone's replicas behind one name: every address the name resolves to, each on its own connection.

A Kubernetes Service with a cluster IP balances connections, not requests, and a gRPC client keeps
one HTTP/2 connection: all of a gateway's requests for a zone would land on one pod, and when that
pod drained, the zone's traffic would leave the zone rather than move to its other pods. So a
zone's edge is named by a headless Service, whose name resolves to every ready pod, and the
gateway balances over the addresses itself, as gRPC's client-side balancing and Envoy's
STRICT_DNS clusters do:

- the name is resolved again every `resolve_interval_s`; a failed or empty lookup keeps the last
  answer (DNS trouble must not empty a zone that is serving);
- each address has its own connection; an address that leaves the answer takes no new requests
  and is closed once its last request has finished;
- a request goes to the less loaded of two serving replicas picked at random (power of two
  choices), so a slow replica, whose requests pile up, gets fewer;
- the zone's health check asks every replica and says healthy as soon as one serves; a replica
  whose answer is still outstanding is not asked again until it answers (or times out);
- a request that finds its replica gone or refusing (draining, loading) before anything came back
  goes to another serving replica: a rolling restart of a zone's pods keeps its traffic in the
  zone. So does a call, or a stream still waiting for its first item, when its replica's probe
  gets no answer (a silent replica: the zone, healthy on its others, would not end that wait).
  A replica gone mid-stream is its own failure while another serves: the stream resumes in the
  zone. Any other failure goes to the zone's failover as it is;
- the tries of one request made under `distinct_replicas()` (a hedge sent within the zone, a
  stream resumed in it after a stall) go to different replicas while the zone has any other
  serving one;
- a replica whose tries stall or lose to in-zone hedges `consecutive_failures` times in a row is
  ejected for a while (outlier detection, gateway/outliers.py), as long as others serve: a wedged
  replica still answers its probes, so only its requests can tell. The caller says which try
  was slow through the try's `Placement`.

An IP address is its own answer: a single replica, never looked up again (the local stack); a
fixed list of them (`hosts` in the topology, `fixed`) is a zone of several without DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from gateway.aio import next_watched, watched
from gateway.errors import UpstreamFailure
from gateway.outliers import DEFAULT_POLICY, EjectionPolicy, Outlier
from gateway.upstreams import GenerateCall, GenerateChunk

C = TypeVar("C")
T = TypeVar("T")
Address = tuple[str, int]
Resolver = Callable[[str, int], Awaitable[list[Address]]]

log = logging.getLogger("meridian.gateway.replicas")


async def resolve(host: str, port: int) -> list[Address]:
    """Every TCP address `host` resolves to, in the resolver's order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))


def fixed(hosts: list[str]) -> Resolver:
    """The resolver of a fixed set of addresses (a zone's `hosts`): the same answer every time."""
    async def addresses(host: str, port: int) -> list[Address]:
        return [(h, port) for h in hosts]

    return addresses


# The replicas that the tries of the current request used (`distinct_replicas`); None outside one.
_used: contextvars.ContextVar[set | None] = contextvars.ContextVar("meridian_replicas_used", default=None)


@contextlib.contextmanager
def distinct_replicas(used: set | None = None) -> Iterator[None]:
    """Within this block, and in tasks started from it, each try of the request avoids the replicas
    its earlier tries used (when another replica serves), so that a hedge within a zone goes to a
    different replica rather than back to the slow one. `used`: the set to keep them in, for a
    request whose tries span several blocks (a stream's resumes)."""
    token = _used.set(set() if used is None else used)
    try:
        yield
    finally:
        _used.reset(token)


# Where the current try went (`placed`); None outside one.
_placement: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("meridian_placement", default=None)


@dataclass(slots=True)
class Placement:
    """Where one try of a request went: set when a replica set picks its replica, so that what
    only the caller sees (the try stalled, or lost to a hedge) reaches that replica."""

    owner: ReplicaSet | None = None
    replica: Replica | None = None

    def slow(self) -> None:
        """The try got nothing back in time: a failure towards its replica's ejection."""
        if self.owner is not None and self.replica is not None:
            self.owner.record_slow(self.replica)

    def answered(self) -> None:
        """The try's answer came in full (a stream's last chunk): its replica's failure streak ends."""
        if self.replica is not None:
            self.replica.outlier.record_success()


@contextlib.contextmanager
def placed(placement: Placement) -> Iterator[Placement]:
    """Within this block (a try, in a task or a stream's opening), the replica picked is noted in `placement`."""
    token = _placement.set(placement)
    try:
        yield placement
    finally:
        _placement.reset(token)


def _where(replica: Replica) -> str:
    host, port = replica.address
    return f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(eq=False, slots=True)
class Replica(Generic[C]):
    """One address of the zone, its connection, and what the gateway knows of it."""

    address: Address
    conn: C
    # Optimistic until the first probe: a headless Service lists only ready pods.
    serving: bool = True
    # Its last probe got an answer, whatever the answer said (a draining replica answers).
    answering: bool = True
    outstanding: int = 0
    retired: bool = False
    probe: asyncio.Task | None = None
    outlier: Outlier = field(default_factory=Outlier)

    def takes_requests(self, now: float) -> bool:
        """Serving by its probe and not ejected by outlier detection."""
        return self.serving and not self.outlier.ejected(now)


class ReplicaSet(Generic[C]):
    """The replicas of one name, kept in step with what the name resolves to."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect: Callable[[str, int], C],
        close: Callable[[C], Awaitable[None]],
        resolve_interval_s: float = 5.0,
        resolver: Resolver = resolve,
        ejection: EjectionPolicy = DEFAULT_POLICY,
        rng: random.Random | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._ejection = ejection
        self._connect, self._close = connect, close
        self._interval = resolve_interval_s
        self._resolver = resolver
        self._rng = rng or random.Random()
        self.replicas: list[Replica[C]] = []
        self._retired: set[Replica[C]] = set()
        self._closing: set[asyncio.Task] = set()
        self._resolved_at: float | None = None
        self._refreshing: asyncio.Task | None = None
        self._lookup_failed = False
        # Requests and streams this set sent on to another replica when theirs was lost, and
        # replicas it ejected as outliers (metrics).
        self.moved = 0
        self.ejections = 0
        if _is_ip(host):
            self._update([(host, port)])

    async def ready(self) -> None:
        """Resolve the name if it never has been (the first request or probe waits for it)."""
        if self._resolved_at is None:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(self.refresh())
            # One lookup for every waiter; a waiter that gives up does not cancel it for the rest.
            await asyncio.shield(self._refreshing)

    async def refresh(self) -> None:
        """Look the name up again and bring the replicas in step with the answer."""
        try:
            addresses = await self._resolver(self.host, self.port)
        except Exception as exc:  # noqa: BLE001 - socket.gaierror, or a broken resolver: keep the last answer
            addresses, error = [], str(exc) or type(exc).__name__
        else:
            error = "" if addresses else "no addresses"
        if error:
            if not self._lookup_failed:
                log.warning("name did not resolve; keeping the last answer",
                            extra={"host": self.host, "error": error, "replicas": len(self.replicas)})
            self._lookup_failed = True
            self._resolved_at = time.monotonic()
            return
        self._lookup_failed = False
        self._update(addresses)

    def _update(self, addresses: list[Address]) -> None:
        self._resolved_at = time.monotonic()
        known = {r.address: r for r in self.replicas}
        wanted = set(addresses)
        for replica in self.replicas:
            if replica.address not in wanted:
                self._retire(replica)
        self.replicas = [known.get(a) or Replica(a, self._connect(*a)) for a in addresses]
        if set(known) != wanted:
            log.info("replicas changed", extra={"host": self.host, "addresses": [f"{h}:{p}" for h, p in addresses]})

    def _retire(self, replica: Replica[C]) -> None:
        replica.retired = True
        if replica.probe is not None:
            replica.probe.cancel()
        if replica.outstanding:
            self._retired.add(replica)  # closed when its last request ends (`lease`)
        else:
            self._close_later(replica)

    def _close_later(self, replica: Replica[C]) -> None:
        task = asyncio.ensure_future(self._close(replica.conn))
        self._closing.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing a replica's connection failed", extra={"host": self.host, "error": str(task.exception())})

    @property
    def serving(self) -> int:
        """How many replicas take requests: serving by the last word on each and not ejected
        (those ejected count again when no other serves: then nothing is ejected, `pick`)."""
        now = time.monotonic()
        return sum(r.takes_requests(now) for r in self.replicas) or sum(r.serving for r in self.replicas)

    def pick(self, exclude: tuple[Replica[C], ...] = (), *, serving_only: bool = False) -> Replica[C] | None:
        """The less loaded of two serving replicas picked at random, ejected ones only when no other
        serves; with none serving, any replica (unless `serving_only`): the caller's failure then
        tells the zone's failover what happened."""
        now = time.monotonic()
        candidates = [r for r in self.replicas if r.serving and r not in exclude]
        candidates = [r for r in candidates if not r.outlier.ejected(now)] or candidates
        if not candidates and not serving_only:
            candidates = [r for r in self.replicas if r not in exclude]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self._rng.sample(candidates, 2)
        return a if a.outstanding <= b.outstanding else b

    @contextlib.contextmanager
    def lease(self, replica: Replica[C]) -> Iterator[C]:
        """Count a request on `replica` while it runs (and note it for the request's other tries)."""
        used, placement = _used.get(), _placement.get()
        if used is not None:
            used.add(replica)
        if placement is not None:
            placement.owner, placement.replica = self, replica
        replica.outstanding += 1
        try:
            yield replica.conn
        finally:
            replica.outstanding -= 1
            if replica.retired and not replica.outstanding and replica in self._retired:
                self._retired.discard(replica)
                self._close_later(replica)

    def record_slow(self, replica: Replica[C]) -> None:
        """A try on `replica` stalled or lost to a hedge sent within the zone. In a row, these eject
        it for a while, unless that would leave the zone no other replica taking requests or more
        than half of them out (its probes pass: a wedged worker still answers them)."""
        if replica.retired or replica not in self.replicas:
            return
        now = time.monotonic()
        if not replica.outlier.record_failure(self._ejection, now, may_eject=self._may_eject(replica, now)):
            return
        self.ejections += 1
        log.warning("replica ejected: its requests stall or lose to hedges", extra={
            "host": self.host, "address": _where(replica),
            "seconds": round(replica.outlier.ejected_until - now, 3),
        })

    def _may_eject(self, replica: Replica[C], now: float) -> bool:
        others = [r for r in self.replicas if r is not replica]
        out = sum(r.outlier.ejected(now) for r in others)
        return any(r.takes_requests(now) for r in others) and out + 1 <= len(self.replicas) // 2

    def _mark_down(self, replica: Replica[C], failure: UpstreamFailure) -> None:
        """A request found the replica gone or refusing: no more requests until a probe says it serves."""
        if replica.serving:
            log.warning("replica not serving", extra={"host": self.host, "address": _where(replica), "error": str(failure)})
        replica.serving = False

    async def call(self, request: Callable[[C], Awaitable[T]]) -> T:
        """`request` on one replica, and on another serving one if that one was gone or refused it."""
        tried: tuple[Replica[C], ...] = ()
        while True:
            replica = await self._pick_for_request(tried)
            with self.lease(replica) as conn:
                try:
                    if len(self.replicas) < 2:  # nowhere else in the zone to go: no watching
                        answer = await request(conn)
                    else:
                        answer = await watched(request(conn), self._silence(replica))
                    replica.outlier.record_success()
                    return answer
                except UpstreamFailure as failure:
                    tried = self._another_or_raise(replica, tried, failure)

    async def stream(self, request: Callable[[C], AsyncIterator[T]]) -> AsyncIterator[T]:
        """The items of `request` from one replica; sent to another serving one if that one was
        gone or refused it before the first item (after that, the failure is the caller's to
        resume, marked `in_zone` when the replica is gone and the zone has another)."""
        tried: tuple[Replica[C], ...] = ()
        while True:
            replica = await self._pick_for_request(tried)
            started = False
            with self.lease(replica) as conn:
                try:
                    # Closed with this generator, not whenever the collector gets to it: closing
                    # is what ends the call upstream and frees the replica.
                    async with contextlib.aclosing(request(conn)) as items:
                        try:
                            first = await self._first(items, replica)
                        except StopAsyncIteration:
                            return
                        started = True
                        yield first
                        async for item in self._rest(items, replica):
                            yield item
                    return
                except UpstreamFailure as failure:
                    if not started:
                        tried = self._another_or_raise(replica, tried, failure)
                        continue
                    moved = self._gone_mid_stream(replica, failure)
                    if moved is None:
                        raise
                    raise moved from failure

    async def _rest(self, items: AsyncIterator[T], replica: Replica[C]) -> AsyncIterator[T]:
        """The items after the first; with other replicas to go on from, watched for the replica
        falling silent (its probe gets no answer), which is seen sooner than a stalled stream."""
        if len(self.replicas) < 2:
            async for item in items:
                yield item
            return
        silence = self._silence(replica, "went silent mid-stream")
        while True:
            try:
                item = await next_watched(items, silence)
            except StopAsyncIteration:
                return
            yield item

    def _gone_mid_stream(self, replica: Replica[C], failure: UpstreamFailure) -> UpstreamFailure | None:
        """A stream broke after its first item: its caller resumes it. When the replica is gone
        (connection refused or reset) or silent, and another one serves, that is the replica's
        failure, not the zone's: the failure returned says so (`in_zone`), so the stream goes on
        in the zone and the zone is not ejected for one lost pod. None: `failure` stands as it is."""
        if not failure.hard and replica.answering:
            return None
        self._mark_down(replica, failure)
        if self.pick((replica,), serving_only=True) is None:
            return None
        self.moved += 1
        return UpstreamFailure(f"{failure}; another replica serves", timeout=failure.timeout, in_zone=True)

    async def _first(self, items: AsyncIterator[T], replica: Replica[C]) -> T:
        """The first item, unless the replica's probe gets no answer meanwhile (`_silence`)."""
        return await next_watched(items, self._silence(replica))

    @staticmethod
    def _silence(replica: Replica[C], what: str = "went down before answering") -> Callable[[], UpstreamFailure | None]:
        """A failure once the replica's probe gets no answer. A silent replica keeps its connection
        open, and the zone stays healthy on its other replicas, so nothing else would end a wait
        for its answer before the call's own timeout (30 s: the core may queue a long prefill).
        A replica that answers NOT_SERVING is draining: what it has started, it finishes."""
        def silent() -> UpstreamFailure | None:
            if replica.answering:
                return None
            return UpstreamFailure(f"{_where(replica)} {what}", timeout=True, refused=True)

        return silent

    async def _pick_for_request(self, tried: tuple[Replica[C], ...]) -> Replica[C]:
        await self.ready()
        used = _used.get()
        replica = self.pick((*tried, *used), serving_only=True) if used else None
        replica = replica or self.pick(tried)
        if replica is None:
            raise UpstreamFailure(f"{self.host}:{self.port} resolves to no address", hard=True)
        return replica

    def _another_or_raise(
        self, replica: Replica[C], tried: tuple[Replica[C], ...], failure: UpstreamFailure
    ) -> tuple[Replica[C], ...]:
        """The replicas tried so far, when `failure` lets the request go to another serving one."""
        if not (failure.hard or failure.refused):
            raise failure
        self._mark_down(replica, failure)
        tried = (*tried, replica)
        if self.pick(tried, serving_only=True) is None:
            raise failure
        self.moved += 1
        return tried

    async def probe(self, check: Callable[[C], Awaitable[bool]], timeout: float) -> bool:
        """Ask every replica whether it serves, each given `timeout` to answer; True as soon as one does."""
        self._refresh_if_due()
        await self.ready()
        for replica in self.replicas:
            if replica.probe is None or replica.probe.done():
                replica.probe = asyncio.ensure_future(self._probe_one(replica, check, timeout))
        # Waiting does not cancel the probes: one that outlives this call still records its answer.
        pending = {r.probe for r in self.replicas if r.probe is not None}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.result() for t in done):
                return True
        return False

    async def _probe_one(self, replica: Replica[C], check: Callable[[C], Awaitable[bool]], timeout: float) -> bool:
        """`check` answers whether the replica serves, and raises when it got no answer. Bounded
        here too: a check that outlived its own timeout would keep the replica from being asked again."""
        try:
            # A timeout scope, not wait_for: no inner task whose late failure nobody would retrieve.
            async with asyncio.timeout(timeout):
                ok = await check(replica.conn) is True
            answering = True
        except Exception:  # noqa: BLE001 - no answer at all: silent, refusing connections, or broken
            ok = answering = False
        if ok != replica.serving:
            state = "serving" if ok else ("not serving" if answering else "not answering")
            log.warning(f"replica {state}", extra={"host": self.host, "address": _where(replica)})
        replica.serving, replica.answering = ok, answering
        return ok

    def _refresh_if_due(self) -> None:
        if self._resolved_at is None or _is_ip(self.host):
            return
        # An empty set (the name never resolved) is looked up again at the probes' pace.
        due = not self.replicas or time.monotonic() - self._resolved_at >= self._interval
        if due and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(self.refresh())

    async def close(self) -> None:
        """Close every connection, the retired ones' included."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        everything = [*self.replicas, *self._retired]
        for replica in everything:
            if replica.probe is not None:
                replica.probe.cancel()
        self.replicas, self._retired = [], set()
        await asyncio.gather(*(self._close(r.conn) for r in everything), return_exceptions=True)


class Channel(Protocol):
    """One address's connection, as `ReplicatedUpstream` uses it."""

    def generate(self, call: GenerateCall, *, timeout: float) -> AsyncIterator[GenerateChunk]: ...

    async def health(self, *, timeout: float) -> bool: ...

    async def close(self) -> None: ...


Ch = TypeVar("Ch", bound=Channel)


class ReplicatedUpstream(Generic[Ch]):
    """The Upstream calls common to a zone's replicas of any tier: generation streams, health and
    closing, over a ReplicaSet of channels (subclasses add `embed` and name their tier)."""

    def __init__(
        self,
        zone: str,
        host: str,
        port: int,
        connect: Callable[[str, int], Ch],
        *,
        resolve_interval_s: float,
        resolver: Resolver,
        ejection: EjectionPolicy,
    ) -> None:
        self.zone = zone
        self.replicas: ReplicaSet[Ch] = ReplicaSet(
            host, port, connect=connect, close=lambda ch: ch.close(),
            resolve_interval_s=resolve_interval_s, resolver=resolver, ejection=ejection,
        )

    @property
    def serving_replicas(self) -> int:
        """The zone's serving replicas."""
        return self.replicas.serving

    @property
    def replica_moves(self) -> int:
        """Requests and streams sent on to another of the zone's replicas when theirs was lost."""
        return self.replicas.moved

    @property
    def replica_ejections(self) -> int:
        """Replicas ejected as outliers (their requests stalled while their probes passed)."""
        return self.replicas.ejections

    async def generate(self, call: GenerateCall, *, timeout: float) -> AsyncIterator[GenerateChunk]:
        """Stream a generation from one of the zone's replicas."""
        async with contextlib.aclosing(self.replicas.stream(lambda ch: ch.generate(call, timeout=timeout))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def health(self, *, timeout: float) -> bool:
        """Whether at least one of the zone's replicas serves."""
        return await self.replicas.probe(lambda ch: ch.health(timeout=timeout), timeout)

    async def close(self) -> None:
        """Close every replica's connection."""
        await self.replicas.close()
