"""Short regional failover drills, run for real: a stack behind fault proxies, load, faults."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import meridian

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def drills(tmp_path_factory) -> tuple[int, list[str], Path]:
    out = tmp_path_factory.mktemp("drills")
    # One stack, four faults; kill-zone last (nothing to restart after it).
    result = meridian("drill", "blackhole-zone", "slow-zone", "kill-redis", "kill-zone", "--out", str(out),
                      "--before", "3", "--during", "4", "--after", "3", timeout=900)
    sys.stdout.write(result.stdout[-12000:] + result.stderr[-4000:])  # a broken drill prints the gateway log tail
    return result.returncode, (result.stdout + result.stderr[-3000:]).strip().splitlines() if result.returncode \
        else result.stdout.strip().splitlines(), out


def test_drills_pass_and_print_the_report_path_last(drills):
    code, lines, out = drills
    assert code == 0, "\n".join(lines[-40:])
    assert Path(lines[-1]) == out / "summary.json"


@pytest.mark.parametrize("scenario", ["blackhole-zone", "slow-zone", "kill-redis", "kill-zone"])
def test_each_report(drills, scenario):
    _, _, out = drills
    report = json.loads((out / f"{scenario}.json").read_text())
    for key in ("client_failures", "recovery_seconds", "p99_ms_before", "p99_ms_during", "p99_ms_after",
                "retries", "streams_resumed", "streams_token_identical"):
        assert key in report
    assert report["client_failures"] == 0, report["failures"]
    assert report["streams_token_identical"] is True
    if scenario in ("blackhole-zone", "kill-zone"):  # the drill strikes mid-stream: one was resumed
        assert report["streams_compared"] > 0
    if scenario == "slow-zone":
        assert report["shift_seconds"] is not None and report["shift_seconds"] <= 2.0
    else:
        assert report["recovery_seconds"] <= 1.0
    assert (out / f"{scenario}.png").stat().st_size > 10_000
    assert (out / f"{scenario}.txt").read_text().startswith(f"drill {scenario}")


def test_kill_zone_resumed_a_stream(drills):
    _, _, out = drills
    report = json.loads((out / "kill-zone.json").read_text())
    assert report["streams_resumed"] >= 1


# Per part doubled: the drill that kills one replica and the one that freezes one, in one stack.
REPLICA_DRILLS = {"edge": ("kill-replica", "freeze-replica"), "core": ("kill-core-replica", "freeze-core-replica")}


@pytest.fixture(scope="module", params=[("edge", "20"), ("core", "10")], ids=["edge", "core"])
def replica_drills(request, tmp_path_factory) -> tuple[str, int, str, Path]:
    # A stack per part: the zones' edges on two workers, or their cores on two Tritons, which the
    # drills above do not need. One part doubled at a time: six Tritons and edge workers together
    # on two cores slowed the probes enough for the latency ranking to move traffic.
    part, embed_rate = request.param
    out = tmp_path_factory.mktemp(part)
    result = meridian("drill", *REPLICA_DRILLS[part], "--out", str(out), "--before", "3", "--during", "4",
                      "--after", "3", "--embed-rate", embed_rate, "--stream-rate", "2", timeout=900)
    sys.stdout.write(result.stdout[-8000:] + result.stderr[-3000:])
    return part, result.returncode, result.stdout + result.stderr[-3000:], out


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_losing_one_of_a_zone_s_replicas_fails_nothing_and_keeps_the_traffic_in_the_zone(replica_drills, fault):
    """Killed (SIGKILL: its connections reset) or frozen (SIGSTOP: they stay open, nothing answers)."""
    part, code, output, out = replica_drills
    scenario = REPLICA_DRILLS[part][fault == "freeze"]
    assert code == 0, output[-4000:]
    report = json.loads((out / f"{scenario}.json").read_text())
    assert report["passed"] and report["client_failures"] == 0, report["problems"] + report["failures"]
    # The zone kept its traffic (before the fault, the latency ranking may have sent some of it to
    # the other zone while the machine was busy).
    assert report["zone_share_before"] >= 0.5
    assert report["zone_share_during"] >= max(0.75, report["zone_share_before"] - 0.1), report
    assert report["streams_token_identical"] is True
    # The zone struck ran two of the part, one of which the drill struck and brought back.
    logs = out / "stack" / "logs"
    assert (logs / f"{report['zone']}-{part}.log").exists() and (logs / f"{report['zone']}-{part}-2.log").exists()
    if part == "core":
        # Struck while generating (the drill picks the busy Triton): what it was serving moved on in the zone.
        assert report["replica_moves"] >= 1, report
    if fault == "freeze":  # thawed, it serves again: the gateway counts every replica it had
        assert report["rejoin_seconds"] is not None and report["rejoin_seconds"] <= 10, report
