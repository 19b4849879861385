"""The replica set's pure logic (gateway/replicas.py): picking, probing, following the name.
The edge client over real workers is in test_edge_replicas.py."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time

from gateway.outliers import EjectionPolicy
from gateway.replicas import Placement, ReplicaSet, placed, resolve


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def replica_set(answer: list, **kw) -> ReplicaSet[Conn]:
    async def resolver(host, port):
        if isinstance(answer[0], Exception):
            raise answer[0]
        return list(answer[0])

    return ReplicaSet("edge.zone-a", 50051, connect=Conn, close=Conn.close, resolver=resolver,
                      rng=random.Random(0), **kw)


async def test_an_ip_address_is_one_replica_without_a_lookup():
    async def resolver(host, port):
        raise AssertionError("an IP address is never looked up")

    rs = ReplicaSet("127.0.0.1", 7, connect=Conn, close=Conn.close, resolver=resolver)
    await rs.ready()
    assert [r.address for r in rs.replicas] == [("127.0.0.1", 7)]


async def test_the_system_resolver_answers_for_localhost():
    assert ("127.0.0.1", 9) in await resolve("localhost", 9)


async def test_the_less_loaded_of_two_serving_replicas_takes_the_request():
    rs = replica_set([[("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)]])
    await rs.ready()
    busy, down, idle = rs.replicas
    busy.outstanding, down.serving = 5, False
    picks = [rs.pick() for _ in range(200)]
    assert down not in picks
    assert picks.count(idle) == 200  # of {busy, idle}, idle always wins
    busy.outstanding = 0
    picks = [rs.pick() for _ in range(400)]
    assert 140 < picks.count(busy) < 260  # ties split at random


async def test_with_no_replica_serving_any_is_picked_unless_only_serving_ones_will_do():
    rs = replica_set([[("10.0.0.1", 1), ("10.0.0.2", 1)]])
    await rs.ready()
    a, b = rs.replicas
    a.serving = b.serving = False
    assert rs.pick() in (a, b)
    assert rs.pick(serving_only=True) is None
    assert rs.pick((a, b)) is None


async def test_the_zone_is_healthy_as_soon_as_one_replica_serves_and_a_silent_one_is_not_asked_twice():
    rs = replica_set([[("10.0.0.1", 1), ("10.0.0.2", 1)]])
    await rs.ready()
    silent, fine = rs.replicas
    asked = {silent.address: 0, fine.address: 0}

    async def check(conn: Conn) -> bool:
        asked[conn.address] += 1
        if conn.address == silent.address:
            await asyncio.Event().wait()
        return True

    assert await asyncio.wait_for(rs.probe(check, 5.0), 0.5)
    assert await asyncio.wait_for(rs.probe(check, 5.0), 0.5)
    assert asked == {silent.address: 1, fine.address: 2}
    assert fine.serving and silent.serving  # unknown until its probe answers
    await rs.close()


async def test_a_check_that_never_returns_still_ends_at_the_probe_timeout():
    rs = replica_set([[("10.0.0.1", 1)]])
    await rs.ready()
    (stuck,) = rs.replicas

    async def check(conn: Conn) -> bool:  # ignores any timeout of its own
        await asyncio.Event().wait()
        return True

    assert not await asyncio.wait_for(rs.probe(check, 0.1), 1.0)
    assert not stuck.answering and not stuck.serving and stuck.probe.done()


async def test_a_replica_that_answers_not_serving_is_out_and_the_zone_down_when_none_serves():
    rs = replica_set([[("10.0.0.1", 1), ("10.0.0.2", 1)]])
    await rs.ready()
    a, b = rs.replicas

    async def check(conn: Conn) -> bool:
        if conn.address == b.address:
            raise ConnectionRefusedError
        return conn.address == a.address and serving_a

    serving_a = True
    assert await rs.probe(check, 1.0)
    await asyncio.sleep(0)
    assert a.serving and not b.serving
    serving_a = False
    assert not await rs.probe(check, 1.0)
    assert not a.serving


async def test_the_replicas_follow_the_name_and_a_failed_lookup_keeps_the_last_answer():
    answer = [[("10.0.0.1", 1)]]
    rs = replica_set(answer)
    await rs.ready()
    (first,) = rs.replicas
    answer[0] = [("10.0.0.1", 1), ("10.0.0.2", 1)]
    await rs.refresh()
    assert [r.address for r in rs.replicas] == [("10.0.0.1", 1), ("10.0.0.2", 1)]
    assert rs.replicas[0] is first  # kept, with its connection

    with rs.lease(first):
        answer[0] = [("10.0.0.2", 1)]
        await rs.refresh()
        assert first not in rs.replicas and first.retired
        assert rs.pick() is rs.replicas[0]
        await asyncio.sleep(0)
        assert not first.conn.closed  # its request is still running
    await asyncio.sleep(0)
    assert first.conn.closed

    for failure in (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), None):
        answer[0] = failure or []
        await rs.refresh()
        assert [r.address for r in rs.replicas] == [("10.0.0.2", 1)]


async def test_a_name_that_never_resolved_is_tried_again_at_the_probes_pace():
    answer: list = [socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")]
    rs = replica_set(answer, resolve_interval_s=60)
    assert not await rs.probe(lambda conn: asyncio.sleep(0, True), 1.0)
    assert rs.pick() is None
    answer[0] = [("10.0.0.9", 1)]
    await rs.probe(lambda conn: asyncio.sleep(0, True), 1.0)  # starts the lookup
    await asyncio.sleep(0.01)
    assert await rs.probe(lambda conn: asyncio.sleep(0, True), 1.0)
    assert [r.address for r in rs.replicas] == [("10.0.0.9", 1)]
    await rs.close()


class Records(logging.Handler):
    """The messages a logger emits (whatever the process's log configuration did to propagation)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Records:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)


async def test_a_replica_s_changes_of_state_are_logged_once_each():
    rs = replica_set([[("10.0.0.1", 1)]])
    await rs.ready()
    state = {"answer": True}

    async def check(conn: Conn) -> bool:
        if state["answer"] is None:
            raise TimeoutError
        return state["answer"]

    with Records("meridian.gateway.replicas") as logs:
        for answer in (True, None, None, False, True, True):
            state["answer"] = answer
            await rs.probe(check, 1.0)
    assert logs.messages == ["replica not answering", "replica serving"]
    await rs.close()


def slow_try(rs: ReplicaSet[Conn], replica) -> None:
    """A try on `replica` that the caller found slow (stalled, or beaten by a hedge)."""
    placement = Placement()
    with placed(placement), rs.lease(replica):
        pass
    placement.slow()


async def two_replicas() -> ReplicaSet[Conn]:
    """A zone of two replicas, ejected after 2 slow tries in a row for 10 s, doubling up to 60 s."""
    rs = replica_set([[("10.0.0.1", 1), ("10.0.0.2", 1)]],
                     ejection=EjectionPolicy(consecutive_failures=2, base_ejection_s=10.0, max_ejection_s=60.0))
    await rs.ready()
    return rs


async def test_a_replica_whose_tries_stall_in_a_row_is_ejected_while_others_serve():
    rs = await two_replicas()
    wedged, fine = rs.replicas
    slow_try(rs, wedged)
    assert rs.ejections == 0 and rs.serving == 2  # one stall is not yet a pattern
    slow_try(rs, wedged)
    assert rs.ejections == 1 and rs.serving == 1
    wedged.outstanding, fine.outstanding = 0, 9  # even the less loaded is passed over while ejected
    assert {rs.pick() for _ in range(50)} == {fine}
    assert rs.pick((fine,), serving_only=True) is wedged  # but not refused when it is all there is
    # The last replica taking requests is never ejected: the zone's own failover judges the zone.
    slow_try(rs, fine)
    slow_try(rs, fine)
    assert rs.ejections == 1 and not fine.outlier.ejected(time.monotonic())


async def test_an_answer_ends_the_streak_and_the_ejection_ends_by_time_and_doubles():
    rs = await two_replicas()
    flaky, other = rs.replicas
    slow_try(rs, flaky)
    other.outstanding = 9  # so that the call below lands on the flaky one
    assert await rs.call(lambda conn: asyncio.sleep(0, conn)) is flaky.conn
    other.outstanding = 0
    slow_try(rs, flaky)
    assert rs.ejections == 0
    slow_try(rs, flaky)
    first = flaky.outlier.ejected_until - time.monotonic()
    flaky.outlier.ejected_until = time.monotonic()  # as if the interval had passed
    assert rs.serving == 2
    slow_try(rs, flaky)
    slow_try(rs, flaky)
    second = flaky.outlier.ejected_until - time.monotonic()
    assert 9.5 < first <= 10.0 and 19.5 < second <= 20.0


async def test_no_more_than_half_of_a_zone_s_replicas_are_ejected_at_once():
    rs = replica_set([[(f"10.0.0.{i}", 1) for i in range(1, 5)]], ejection=EjectionPolicy(consecutive_failures=1))
    await rs.ready()
    for replica in rs.replicas:
        slow_try(rs, replica)
    assert rs.ejections == 2 and rs.serving == 2


async def test_a_retired_replica_is_not_ejected_and_a_try_elsewhere_charges_no_replica():
    answer = [[("10.0.0.1", 1), ("10.0.0.2", 1)]]
    rs = replica_set(answer, ejection=EjectionPolicy(consecutive_failures=1))
    await rs.ready()
    gone = rs.replicas[0]
    answer[0] = [("10.0.0.2", 1), ("10.0.0.3", 1)]
    await rs.refresh()
    slow_try(rs, gone)
    Placement().slow()  # a try that never reached a replica set (an upstream of another kind)
    assert rs.ejections == 0
