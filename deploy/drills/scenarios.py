"""The faults a drill injects into a running local stack, and how each is undone.

Faults hit the zone that serves the load (found by probing, not assumed from the topology's
order; `zone-a` locally): its loss is what a client would feel, and the drill fails when that
zone did not carry most of the requests before the fault.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

from deploy.drills.faults import Fault
from deploy.drills.proxy import set_fault
from deploy.launcher import LocalStack, http_get
from deploy.processes import Child


@dataclass
class Context:
    stack: LocalStack
    zone: str
    returned_at: float | None = None  # monotonic time the zone answered its health checks again


@dataclass(frozen=True)
class Scenario:
    name: str
    bound_s: float
    # "recovery": p99 back within 2x baseline; "shift": traffic leaves the zone;
    # "return": traffic comes back to the zone after it returns; "available": no client failure
    # (recovery is reported, not judged); "stays": no client failure and the zone keeps its traffic.
    measure: str = "recovery"
    needs_zone_down_first: bool = False
    during_s: float | None = None  # overrides the drill's default fault duration
    hits_zone: bool = True  # the fault strikes the zone carrying the load (not Redis)
    leaves_zone: bool = False  # traffic must move off the zone during the fault
    rejoins: bool = False  # the replica struck must take requests again once the fault is cleared
    # The zones' edges run this many workers each, and their cores this many servers (their
    # `hosts`), in the drill's stack.
    edge_replicas: int = 1
    core_replicas: int = 1

    @property
    def struck_tier(self) -> str | None:
        """The tier one of whose replicas the fault strikes (the drill judges the zone's share of
        that tier's traffic: the other tier's, ranked by probe latency on a shared machine, may move
        for reasons of the host's, not the fault's); None for a fault on the whole zone."""
        if self.edge_replicas > 1:
            return "edge"
        return "core" if self.core_replicas > 1 else None

    async def setup(self, ctx: Context) -> None:
        if self.needs_zone_down_first:
            await kill_zone(ctx)
            await wait_gateway_sees(ctx, healthy=False)

    async def inject(self, ctx: Context) -> None:
        await _ACTIONS[self.name][0](ctx)

    async def clear(self, ctx: Context) -> None:
        await _ACTIONS[self.name][1](ctx)

    async def restore(self, ctx: Context) -> None:
        """Bring every part back so the next scenario starts from a healthy stack."""
        await set_zone_fault(ctx, Fault())
        await thaw(ctx)
        for child in ctx.stack.children:
            if not child.alive():
                child.start()
        await wait_ready(ctx.stack, timeout=180)


# -- actions ------------------------------------------------------------------------------------


async def set_zone_fault(ctx: Context, fault: Fault) -> None:
    url = ctx.stack.proxy_controls.get(ctx.zone)
    if url:
        await asyncio.to_thread(set_fault, url, fault)


# Process control blocks (a SIGTERM'd Triton may take seconds to exit): it runs off the event loop,
# which is also the load generator's, so the load keeps its schedule and its clock.


def _zone_processes(ctx: Context) -> list[Child]:
    """Every edge and core process of the zone struck (a zone of `hosts` runs several of each)."""
    return ctx.stack.replicas(ctx.zone, "edge") + ctx.stack.replicas(ctx.zone, "core")


async def kill_zone(ctx: Context) -> None:
    await asyncio.gather(*(asyncio.to_thread(child.kill) for child in _zone_processes(ctx)))


async def _victim(ctx: Context, part: str, what: str) -> Child:
    """The replica of the zone's edge or core a replica fault strikes: of the cores, the one
    generating now (its streams must resume); of the edges, the first (both take requests)."""
    servers = ctx.stack.replicas(ctx.zone, part)
    if len(servers) < 2:
        raise RuntimeError(f"{what} a {part} replica needs a zone of two or more; {ctx.zone} has {len(servers)}")
    return servers[await asyncio.to_thread(_busiest_core, ctx) if part == "core" else 0]


def _kill_replica(part: str):
    async def kill(ctx: Context) -> None:
        """SIGKILL one of the zone's edge workers or core servers (a lost pod or node: no drain);
        the others serve on."""
        victim = await _victim(ctx, part, "killing")
        await asyncio.to_thread(victim.kill)

    return kill


def _freeze_replica(part: str):
    async def freeze(ctx: Context) -> None:
        """SIGSTOP one of the zone's edge workers or core servers, its children too: a wedged
        replica (a paused VM, a swap storm, a hung GPU driver). Its connections stay open and
        nothing is refused or reset; it just stops answering, probes and requests alike."""
        victim = await _victim(ctx, part, "freezing")
        victim.signal_group(signal.SIGSTOP)

    return freeze


async def thaw(ctx: Context) -> None:
    """SIGCONT every process of the stack: a frozen one carries on where it stopped."""
    for child in ctx.stack.children:
        child.signal_group(signal.SIGCONT)


def _busiest_core(ctx: Context, wait_s: float = 0.3) -> int:
    """Which of the zone's core servers is generating the stream the drill strikes, by the
    `meridian_core_*` gauges on their metrics ports. The gauges are refreshed every 50 ms, so they
    are asked again until exactly one server is busy (a short completion started with the stream
    ends first), for up to `wait_s`; then the first busy one, or the first."""
    zone = next(z for z in ctx.stack.topology.zones if z.name == ctx.zone)
    assert zone.core is not None
    urls = [f"http://{host}:{zone.core.metrics_port}/metrics" for host in zone.replica_hosts("core")]
    deadline = time.monotonic() + wait_s
    while True:
        busy = [i for i, url in enumerate(urls) if _engine_requests(http_get(url, 0.5)[1]) > 0]
        if len(busy) == 1 or time.monotonic() >= deadline:
            return busy[0] if busy else 0
        time.sleep(0.01)


def _engine_requests(metrics: str) -> float:
    """Requests a core's engine is prefilling or decoding, from its metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(("meridian_core_running{", "meridian_core_prefilling{")))


async def restart_zone(ctx: Context) -> None:
    for child in _zone_processes(ctx):
        if not child.alive():
            child.start()
    asyncio.get_running_loop().create_task(_note_return(ctx))


async def _note_return(ctx: Context) -> None:
    ctx.returned_at = await wait_zone_answers(ctx)


async def restart_core(ctx: Context) -> None:
    child = ctx.stack.child(f"{ctx.zone}-core")
    await asyncio.to_thread(child.stop, timeout=10)
    child.start()


async def kill_redis(ctx: Context) -> None:
    await asyncio.to_thread(ctx.stack.child("redis").kill)


async def start_redis(ctx: Context) -> None:
    child = ctx.stack.child("redis")
    if not child.alive():
        child.start()


async def nothing(ctx: Context) -> None:
    return None


def _fault(fault: Fault):
    async def apply(ctx: Context) -> None:
        await set_zone_fault(ctx, fault)

    return apply


_ACTIONS = {
    "kill-zone": (kill_zone, nothing),
    "blackhole-zone": (_fault(Fault(blackhole=True)), _fault(Fault())),
    "slow-zone": (_fault(Fault(latency_ms=300)), _fault(Fault())),
    "restart-core": (restart_core, nothing),
    "kill-redis": (kill_redis, start_redis),
    "zone-returns": (restart_zone, nothing),
    "kill-replica": (_kill_replica("edge"), nothing),
    "kill-core-replica": (_kill_replica("core"), nothing),
    "freeze-replica": (_freeze_replica("edge"), thaw),
    "freeze-core-replica": (_freeze_replica("core"), thaw),
}

SCENARIOS = {
    "kill-zone": Scenario("kill-zone", bound_s=1.0, leaves_zone=True),
    "blackhole-zone": Scenario("blackhole-zone", bound_s=1.0, leaves_zone=True),
    "slow-zone": Scenario("slow-zone", bound_s=2.0, measure="shift"),
    # On one machine a restarting Triton starves every other process of CPU while it loads torch
    # and the model, so latency during a restart says more about the machine than the routing.
    "restart-core": Scenario("restart-core", bound_s=1.0, measure="available", during_s=25.0),
    "kill-redis": Scenario("kill-redis", bound_s=1.0, hits_zone=False),
    "zone-returns": Scenario("zone-returns", bound_s=5.0, measure="return", needs_zone_down_first=True, during_s=40.0),
    # One of two edge workers of the zone lost: its requests go on in the zone, none fails.
    "kill-replica": Scenario("kill-replica", bound_s=1.0, measure="stays", edge_replicas=2),
    # One of two Triton cores of the zone lost (a GPU node): its streams resume on the other, in the zone.
    "kill-core-replica": Scenario("kill-core-replica", bound_s=1.0, measure="stays", core_replicas=2),
    # One of two edge workers, or of two Tritons, frozen (SIGSTOP) and thawed: a replica that holds
    # its connections open and answers nothing. Its probes go unanswered, so what waits on it
    # goes on in the zone, and it takes requests again once it answers.
    "freeze-replica": Scenario("freeze-replica", bound_s=1.0, measure="stays", edge_replicas=2, rejoins=True),
    "freeze-core-replica": Scenario("freeze-core-replica", bound_s=1.0, measure="stays", core_replicas=2,
                                    rejoins=True),
}


# -- waiting ------------------------------------------------------------------------------------

async def wait_ready(stack: LocalStack, timeout: float) -> None:
    """Until the gateway's /readyz is 200."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(http_get, f"{stack.http_url}/readyz")
        if status == 200:
            return
        await asyncio.sleep(0.25)
    last = f"/readyz said {body}" if body else "/readyz did not answer"
    raise TimeoutError(f"the stack was not ready again within {timeout:.0f}s ({last})")


async def wait_gateway_sees(ctx: Context, *, healthy: bool, timeout: float = 30) -> None:
    """Until the gateway's readiness report shows the zone (both tiers) as `healthy`."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = await asyncio.to_thread(http_get, f"{ctx.stack.http_url}/readyz")
        try:
            tiers = json.loads(body)["zones"][ctx.zone]
        except (ValueError, KeyError):
            tiers = {}
        if tiers and all(v == healthy for v in tiers.values()):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the gateway did not see {ctx.zone} {'up' if healthy else 'down'} in {timeout}s")


async def wait_zone_answers(ctx: Context, timeout: float = 180) -> float:
    """Until the zone's edge and core answer health checks directly (not through the gateway)."""
    from grpclib.client import Channel
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

    zone = next(z for z in ctx.stack.topology.zones if z.name == ctx.zone)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        edge_ok = core_ok = False
        if zone.edge:
            channel = Channel(zone.replica_hosts("edge")[0], zone.edge.port)
            try:
                reply = await HealthStub(channel).Check(HealthCheckRequest(), timeout=0.5)
                edge_ok = reply.status == HealthCheckResponse.SERVING
            except Exception:  # noqa: BLE001 - not up yet
                edge_ok = False
            finally:
                channel.close()
        if zone.core:
            host = zone.replica_hosts("core")[0]
            status, _ = await asyncio.to_thread(http_get, f"http://{host}:{zone.core.http_port}/v2/health/ready", 0.5)
            core_ok = status == 200
        if edge_ok and core_ok:
            return time.monotonic()
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{ctx.zone} did not come back within {timeout}s")
