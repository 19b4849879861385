"""A zone whose core is two Triton servers: the session stack's two cores (same checkpoint, CPU,
batch-invariant) taken as the replicas of one zone. A stream whose server's connection is reset
mid-stream (a killed pod) resumes on the other server of the zone, token for token, and the zone
is not charged. Real Tritons, real gRPC; the reset comes from the drills' fault proxy."""

from __future__ import annotations

import pytest

from deploy.drills.faults import Fault
from deploy.drills.proxy import FaultState, Forward, start_forwards
from gateway.config import RoutingConfig
from gateway.core_client import CoreUpstream
from gateway.failover import Failover
from gateway.metrics import Metrics
from gateway.upstreams import GenerateCall, UpstreamPool

pytestmark = pytest.mark.integration

CORE_MODEL = "meridian-moe-mini"


def _core_zone(addresses: list[tuple[str, int]]) -> CoreUpstream:
    async def these(host: str, port: int) -> list[tuple[str, int]]:
        return addresses

    return CoreUpstream("zone-x", "core-zone-x", 8001, [CORE_MODEL], resolver=these)


async def test_a_stream_whose_core_is_reset_mid_stream_goes_on_from_the_zone_s_other_core(stack):
    zone_a, zone_b = stack.topology["zones"][:2]
    a = (zone_a["address"], zone_a["core"]["grpc_port"])
    b = (zone_b["address"], zone_b["core"]["grpc_port"])
    state = FaultState()
    (proxy,) = await start_forwards(state, [Forward("tcp", ("127.0.0.1", 0), a)])
    front = ("127.0.0.1", proxy.sockets[0].getsockname()[1])
    upstream = _core_zone([front, b])
    config = RoutingConfig()
    pool = UpstreamPool([upstream], config)
    failover = Failover(config, Metrics())
    call = GenerateCall(model=CORE_MODEL, prompt="Once upon a time", max_tokens=40, temperature=0.9, seed=5,
                        stream=True)
    try:
        await pool.check_once()
        pool.start()
        live = next(r for r in upstream.replicas.replicas if r.address == b)
        live.outstanding += 1  # so that the stream starts on the core behind the proxy
        stream = failover.stream(pool.for_tier("core"), call)
        await stream.start()
        live.outstanding -= 1
        chunks = stream.chunks()
        got = [await anext(chunks) for _ in range(3)]
        state.set(Fault(reset=True))
        got += [c async for c in chunks]
        await stream.aclose()
        reference = _core_zone([b])
        try:
            expected = [t async for c in reference.generate(call, timeout=60) for t in c.token_ids]
        finally:
            await reference.close()
        assert stream.resumed == 1 and got[-1].finish_reason in ("stop", "length")
        assert [t for c in got for t in c.token_ids] == expected
        endpoint = pool.endpoints[0]
        assert endpoint.available() and endpoint.outlier.consecutive_failures == 0
        assert upstream.replica_moves == 1
        assert failover.metrics.upstream_errors.get("zone-x", "core") == 0
    finally:
        state.set(Fault())
        await pool.close()
        proxy.close()
