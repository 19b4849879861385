"""The drill runner's edges: a stack that fails to start, bad topology files, and a fault that
never touched the traffic (judged from the samples alone)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deploy.drills import runner
from deploy.drills.load import Rates, Sample
from deploy.drills.report import DrillReport
from deploy.drills.runner import Timing
from deploy.drills.scenarios import SCENARIOS
from deploy.launcher import StackError
from gateway.config import load_topology


class FailingStack:
    """Stands in for LocalStack: its start fails as a held port would make it; stop is recorded."""

    instances: list[FailingStack] = []

    def __init__(self, settings, topology, fault_proxies: bool = False) -> None:
        self.stopped = False
        FailingStack.instances.append(self)

    def start(self, timeout: float = 240.0, progress=print, **_) -> None:
        raise StackError("ports already in use: 127.0.51.1:15051/tcp (is another stack running? `meridian down`)")

    def stop(self) -> None:
        self.stopped = True


def drill(tmp_path: Path, topology: str | None = None) -> int:
    return runner.main(["kill-zone"], str(tmp_path / "out"), Timing(), Rates(), topology)


def test_a_stack_that_fails_to_start_is_stopped_and_reported_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERIDIAN_API_KEY", "mk-test")
    monkeypatch.setattr(runner, "LocalStack", FailingStack)
    FailingStack.instances.clear()
    assert drill(tmp_path) == 1
    assert [s.stopped for s in FailingStack.instances] == [True]  # what did start is not orphaned
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: ports already in use: 127.0.51.1:15051/tcp (is another stack running? `meridian down`)"]


@pytest.mark.parametrize("content, says", [
    (None, "cannot read topology"),  # missing file
    ("gateway: [oops\n", "cannot read topology"),  # not YAML
    ("zones: [{name: z}]\n", "zones"),  # YAML, but not a topology
    ("regions: []\n", "no zones to drill"),
])
def test_a_bad_topology_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, content, says):
    monkeypatch.setattr(runner, "LocalStack", FailingStack)
    FailingStack.instances.clear()
    path = tmp_path / "topo.yaml"
    if content is not None:
        path.write_text(content)
    assert drill(tmp_path, str(path)) == 1
    assert FailingStack.instances == []  # refused before anything started
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


# -- judging ------------------------------------------------------------------------------------


def served(zone_before: str, zone_after: str, fault_at: float = 4.0, end: float = 12.0) -> list[Sample]:
    """Embeddings every 0.1 s, answered in 10 ms by one zone before the fault and another after."""
    return [Sample("embed", t / 10, 0.01, True, 200, zone_before if t / 10 < fault_at else zone_after)
            for t in range(round(end * 10))]


def judged(scenario: str, samples: list[Sample], zone: str, fault_at: float = 4.0, fault_end: float = 9.0) -> DrillReport:
    return runner.summarise(SCENARIOS[scenario], zone, samples, fault_at, fault_end, {}, {}, True, 0)


def test_the_target_is_the_zone_that_served_most():
    samples = served("zone-a", "zone-a") + [Sample("embed", 0.0, 0.01, True, 200, "zone-b")]
    samples.append(Sample("embed", 0.0, 0.01, False, 503, "zone-b"))  # a failure served nothing
    assert runner.busiest_zone(samples) == "zone-a"
    assert runner.busiest_zone([Sample("embed", 0.0, ok=True)]) is None
    assert runner.zone_share(served("zone-a", "zone-b"), "zone-a", 4.0) == 1.0
    assert runner.zone_share(served("zone-a", "zone-b"), "zone-b", 4.0) == 0.0
    assert runner.zone_share([], "zone-a", 4.0) is None


@pytest.mark.parametrize("scenario", ["kill-zone", "blackhole-zone"])
def test_a_fault_on_the_zone_carrying_the_load_passes_once_traffic_leaves(scenario):
    r = judged(scenario, served("zone-a", "zone-b"), "zone-a")
    assert r.passed, r.problems
    assert r.problems == [] and r.zone == "zone-a" and r.zone_share_before == 1.0
    assert r.shift_seconds == 0.0


@pytest.mark.parametrize("scenario", ["kill-zone", "blackhole-zone", "slow-zone", "restart-core"])
def test_a_fault_on_an_idle_zone_fails_with_the_reason(scenario):
    """The reviewer's swapped topology: zone-b listed first was struck, zone-a served everything."""
    r = judged(scenario, served("zone-a", "zone-a"), "zone-b")
    assert not r.passed
    assert any("the fault hit zone-b but it was not carrying the load" in p and "0%" in p for p in r.problems)
    assert "FAILED: the fault hit zone-b" in r.to_text()


@pytest.mark.parametrize("scenario", ["kill-zone", "blackhole-zone"])
def test_traffic_that_never_left_the_struck_zone_fails(scenario):
    r = judged(scenario, served("zone-a", "zone-a"), "zone-a")
    assert not r.passed
    assert r.problems == ["traffic never left zone-a during the fault"]


def test_traffic_leaving_only_after_the_fault_ended_fails():
    samples = served("zone-a", "zone-b", fault_at=9.5)  # the fault lasts 4.0-9.0 s
    r = judged("kill-zone", samples, "zone-a")
    assert r.shift_seconds is not None and r.shift_seconds > 5.0
    assert r.problems == ["traffic never left zone-a during the fault"]


def test_a_fault_that_hits_no_zone_needs_no_zone_traffic():
    r = judged("kill-redis", served("zone-a", "zone-a"), "zone-b")
    assert r.passed, r.problems
    assert r.zone == ""


def test_no_answer_naming_a_zone_fails():
    samples = [Sample("embed", t / 10, 0.01, True, 200, "") for t in range(120)]
    r = judged("restart-core", samples, "zone-a")
    assert not r.passed
    assert any("no answer named its zone" in p for p in r.problems)


def test_other_checks_still_fail_with_their_reason():
    r = judged("kill-zone", served("zone-a", "zone-b") + [Sample("embed", 5.0, 0.0, False, 503)], "zone-a")
    assert not r.passed and "1 client request(s) failed" in r.problems
    r = judged("slow-zone", served("zone-a", "zone-a"), "zone-a")
    assert r.problems == ["traffic did not leave zone-a within 2.0s"]
    r.return_seconds = None  # zone-returns judges after its zone is back: taken down first, no share check
    runner._judge(r, SCENARIOS["zone-returns"])
    assert r.problems == ["traffic did not come back to zone-a within 5.0s"]


def test_the_strike_waits_for_a_stream_a_few_chunks_into_the_zone_struck():
    from deploy.drills.load import LoadGenerator

    load = LoadGenerator("http://127.0.0.1:9", "k", "m")
    load.samples = [
        Sample("stream", 0.0, zone="zone-b", streaming=True, chunks=5),  # the other zone
        Sample("stream", 0.0, zone="zone-a", streaming=True, chunks=1),  # may end at its next token
        Sample("stream", 0.0, zone="zone-a", streaming=False, chunks=9),  # finished
    ]
    assert load.streams_in_flight() == 2
    assert load.streams_in_flight("zone-a", min_chunks=3) == 0
    load.samples[1].chunks = 3
    assert load.streams_in_flight("zone-a", min_chunks=3) == 1
    # By its max_tokens, a stream 20 tokens into 24 has 4 to come: too few to strike.
    load.samples[1].body, load.samples[1].chunks = {"max_tokens": 24}, 20
    assert load.streams_in_flight("zone-a", min_chunks=3, min_left=8) == 0
    assert not runner._time_to_strike(load, "zone-a")
    load.samples[1].chunks = 16
    assert load.streams_in_flight("zone-a", min_chunks=3, min_left=8) == 1
    assert runner._time_to_strike(load, "zone-a")
    # ... but not beside a completion: a replica fault could strike its core, not the stream's.
    load.samples.append(Sample("complete", 0.0))
    assert not runner._time_to_strike(load, "zone-a")
    load.samples[-1].answered = True
    assert runner._time_to_strike(load, "zone-a")
    # By its max_tokens, a stream 20 tokens into 24 has 4 to come: too few to strike.
    load.samples[1].body, load.samples[1].chunks = {"max_tokens": 24}, 20
    assert load.streams_in_flight("zone-a", min_chunks=3, min_left=8) == 0
    load.samples[1].chunks = 16
    assert load.streams_in_flight("zone-a", min_chunks=3, min_left=8) == 1


def test_a_zone_that_keeps_its_traffic_through_the_loss_of_a_replica_passes():
    r = judged("kill-replica", served("zone-a", "zone-a"), "zone-a")
    assert r.passed, r.problems
    assert r.zone_share_before == 1.0 and r.zone_share_during == 1.0


def test_traffic_that_leaves_the_zone_when_a_replica_is_lost_fails():
    r = judged("kill-replica", served("zone-a", "zone-b"), "zone-a")
    assert not r.passed
    assert r.problems == ["edge traffic left zone-a during the fault (it served 0% of the answers then)"]


def test_a_replica_drill_judges_the_zone_s_share_of_the_struck_tier_alone():
    # A core replica lost: embeddings (the edge's) that the latency ranking moved to the other zone
    # for a while do not fail it; completions (the core's) that left the zone do.
    embeds = served("zone-a", "zone-b")
    completions = [Sample(s.kind, s.started + 0.05, s.latency, True, 200, "zone-a") for s in embeds[::5]]
    for s in completions:
        s.kind = "complete"
    r = judged("kill-core-replica", embeds + completions, "zone-a")
    assert r.passed, r.problems
    assert r.zone_tier == "core" and r.zone_share_during == 1.0
    assert "of the core requests" in r.to_text()
    for s in completions:
        s.zone = "zone-b" if s.started > 4.0 else s.zone
    r = judged("kill-core-replica", embeds + completions, "zone-a")
    assert r.problems == ["core traffic left zone-a during the fault (it served 0% of the answers then)"]
    assert judged("kill-zone", embeds, "zone-a").zone_tier is None  # a whole zone: every request counts


@pytest.mark.parametrize("part, other", [("edge", "core"), ("core", "edge")])
def test_the_drill_stack_gives_each_zone_the_replicas_a_scenario_needs(tmp_path, part, other):
    settings = runner.drill_settings(tmp_path, None, **{f"{part}_replicas": 2})
    for i, zone in enumerate(load_topology(settings.topology).zones):
        assert getattr(zone, part).hosts == [f"127.0.{51 + 2 * i}.1", f"127.0.{51 + 2 * i}.3"]
        assert zone.replica_hosts(other) == [zone.address]
    single = load_topology(runner.drill_settings(tmp_path / "one", None).topology)
    assert all(not getattr(z, part).hosts for z in single.zones)
    assert SCENARIOS["kill-replica"].edge_replicas == SCENARIOS["kill-core-replica"].core_replicas == 2


def test_a_frozen_replica_that_never_takes_requests_again_fails():
    r = judged("freeze-replica", served("zone-a", "zone-a"), "zone-a")
    assert r.problems == ["the replica struck did not take requests again within 10s of the thaw"]
    r.rejoin_seconds = 0.4
    runner._judge(r, SCENARIOS["freeze-replica"])
    assert r.passed, r.problems
    assert "took requests again 0.40s after the thaw" in r.to_text()
    assert not SCENARIOS["kill-replica"].rejoins  # a killed replica is started again only by restore()


async def test_waiting_for_every_replica_ends_when_the_gateway_counts_them_all(monkeypatch):
    counts = iter([4.0, 5.0, 6.0])

    class Stack:
        http_url = "http://gw"

    async def scrape(url):
        return {runner.SERVING_REPLICAS: next(counts)}

    monkeypatch.setattr(runner, "stack_replicas", lambda stack: 6)
    monkeypatch.setattr(runner, "scrape", scrape)
    waited = await runner.wait_all_serving(Stack(), timeout=5)
    assert waited is not None and 0.2 <= waited < 2.0
    monkeypatch.setattr(runner, "scrape", lambda url: asyncio.sleep(0, {runner.SERVING_REPLICAS: 5.0}))
    assert await runner.wait_all_serving(Stack(), timeout=0.3) is None


def test_the_replicas_counted_are_every_zone_s_edge_workers_and_cores(tmp_path):
    class Stack:
        topology = load_topology(runner.drill_settings(tmp_path, None, edge_replicas=2).topology)

    assert runner.stack_replicas(Stack()) == 6  # two zones: two edge workers and one core each
