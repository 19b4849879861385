"""A drill's numbers from its samples: failures, latency before/during/after, recovery, shifts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.drills.load import Sample

WINDOW_S = 0.5
STEP_S = 0.1


@dataclass
class DrillReport:
    scenario: str
    fault_at: float  # seconds since the load began
    fault_end: float
    client_failures: int
    requests: int
    recovery_seconds: float
    p50_ms_before: float
    p99_ms_before: float
    p50_ms_during: float
    p99_ms_during: float
    p50_ms_after: float
    p99_ms_after: float
    retries: float
    streams: int
    streams_resumed: float
    streams_token_identical: bool
    streams_compared: int
    replica_moves: float = 0.0  # requests and streams sent on to another replica of their zone
    shift_seconds: float | None = None  # slow/kill/blackhole-zone: until the struck zone lost its traffic
    return_seconds: float | None = None  # zone-returns: until the zone got traffic back
    rejoin_seconds: float | None = None  # freeze-*: from the thaw until the replica took requests again
    bound_seconds: float = 1.0
    zone: str = ""  # the zone the fault hit ("" when it hit none)
    zone_tier: str | None = None  # a replica drill's tier: the shares below count its requests alone
    zone_share_before: float | None = None  # of the answers before the fault, the share that zone served
    zone_share_during: float | None = None  # and of the answers to requests made during the fault
    passed: bool = False
    problems: list[str] = field(default_factory=list)  # why it failed, one line per check missed
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_text(self) -> str:
        """A short human summary."""
        lines = [
            f"drill {self.scenario}: {'PASSED' if self.passed else 'FAILED'}",
            f"  requests {self.requests}, client failures {self.client_failures}",
            f"  recovery {self.recovery_seconds:.2f}s (bound {self.bound_seconds:.1f}s)",
            f"  p50/p99 ms  before {self.p50_ms_before:.0f}/{self.p99_ms_before:.0f}"
            f"  during {self.p50_ms_during:.0f}/{self.p99_ms_during:.0f}"
            f"  after {self.p50_ms_after:.0f}/{self.p99_ms_after:.0f}",
            f"  retries {self.retries:.0f}, streams {self.streams}, resumed {self.streams_resumed:.0f}, "
            f"token-identical {self.streams_token_identical} ({self.streams_compared} compared)",
        ]
        if self.replica_moves:
            lines.append(f"  moved to another replica of their zone: {self.replica_moves:.0f}")
        if self.shift_seconds is not None:
            lines.append(f"  traffic left the zone in {self.shift_seconds:.2f}s")
        if self.return_seconds is not None:
            lines.append(f"  traffic came back to the zone in {self.return_seconds:.2f}s")
        if self.rejoin_seconds is not None:
            lines.append(f"  the frozen replica took requests again {self.rejoin_seconds:.2f}s after the thaw")
        if self.zone:
            before, during = (("?" if v is None else f"{v:.0%}") for v in (self.zone_share_before, self.zone_share_during))
            which = f"the {self.zone_tier} requests" if self.zone_tier else "the requests"
            lines.append(f"  fault hit {self.zone}, which served {before} of {which} before it, {during} during it")
        lines += [f"  FAILED: {p}" for p in self.problems]
        lines += [f"  ! {f}" for f in self.failures[:10]]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def baselines(samples: list[Sample], fault_at: float) -> dict[str, float]:
    """Each kind's p99 latency over the requests that finished before the fault."""
    out = {}
    for kind in {s.kind for s in samples}:
        before = [s.latency for s in samples if s.kind == kind and s.ok and s.started + s.latency < fault_at]
        out[kind] = percentile(before, 99) or 1.0
    return out


def recovery_seconds(samples: list[Sample], fault_at: float, base: dict[str, float],
                     fault_end: float | None = None, zone: str = "") -> float:
    """Time from the fault to the end of the last window whose p99 is over 2x baseline (or that failed).

    Latencies are taken relative to each kind's baseline p99, so embeddings and streams count alike,
    and within DEGRADED_MIN_EXTRA_S of it they count as unchanged.
    Only requests that started while the fault held count: the fault's end (a zone coming back) is
    an event of its own, measured by the zone-returns drill.
    A window's only slow answer does not count when the fault never touched it (`touched`): on two
    shared cores any process can stall one answer for tens of ms, whereas the fault's own cost
    falls on the requests that met the struck `zone`, and overload of the zones left slows many.
    """
    # Requests in flight when the fault hit count from the fault's moment.
    until = fault_end if fault_end is not None else float("inf")
    after = [(max(s.started, fault_at), s) for s in samples
             if s.started + s.latency >= fault_at and s.started < until]
    if not after:
        return 0.0
    end = max(t for t, _ in after)
    last_bad = fault_at
    t = fault_at
    while t <= end:
        window = [s for at, s in after if t <= at < t + WINDOW_S]
        if _degraded(window, base, fault_at, zone):
            last_bad = min(t + WINDOW_S, end)
        t += STEP_S
    return max(0.0, last_bad - fault_at)


def _degraded(window: list[Sample], base: dict[str, float], fault_at: float, zone: str) -> bool:
    if any(not s.ok for s in window):
        return True
    ratios = [(_slowdown(s, base.get(s.kind, 1.0)), s) for s in window]
    if not ratios or percentile([r for r, _ in ratios], 99) <= 2.0:
        return False
    slow = [s for r, s in ratios if r > 2.0]
    return len(slow) >= 2 or any(touched(s, fault_at, zone) for s in slow)


def touched(sample: Sample, fault_at: float, zone: str) -> bool:
    """Whether the fault could have slowed this request itself: it was in flight when the fault
    hit, was answered by the struck zone, took more than one try (a hedge, a retry) or was resumed.
    Every request, for a fault that struck no zone (Redis)."""
    return (not zone or sample.started < fault_at or sample.zone == zone
            or sample.attempts > 1 or sample.resumed > 0)


# A request counts as slowed by the fault only when it is over 2x its kind's baseline
# p99 *and* this much above it: a 10 ms embedding taking 30 ms on two shared cores is the machine,
# not a failover (a blackholed zone costs the 250 ms hedge delay, a slow one its 600 ms).
DEGRADED_MIN_EXTRA_S = 0.025


def _slowdown(sample: Sample, baseline: float) -> float:
    """The sample's latency over its kind's baseline, or 1 when it is within the absolute slack."""
    if sample.latency - baseline < DEGRADED_MIN_EXTRA_S:
        return 1.0
    return sample.latency / baseline


def first_time(samples: list[Sample], since: float, predicate, window: int = 5) -> float | None:
    """Seconds after `since` until `window` consecutive answers satisfy `predicate`."""
    ordered = sorted((s for s in samples if s.started >= since and s.ok and s.kind != "stream"), key=lambda s: s.started)
    run = 0
    for i, s in enumerate(ordered):
        run = run + 1 if predicate(s) else 0
        if run >= window:
            return ordered[i - window + 1].started - since
    return None


def phase(samples: list[Sample], start: float, end: float) -> list[float]:
    """Latencies (ms) of the requests that started in [start, end) or were in flight at `start`."""
    return [s.latency * 1000 for s in samples
            if s.ok and s.started < end and (s.started >= start or s.started + s.latency >= start > 0)]


def plot(samples: list[Sample], report: DrillReport, path: Path) -> None:
    """Latency over time, one colour per kind, failures in red, the fault shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.axvspan(report.fault_at, report.fault_end, color="orange", alpha=0.15, label="fault")
    for kind, colour in (("embed", "tab:blue"), ("complete", "tab:green"), ("stream", "tab:purple")):
        pts = [(s.started, s.latency * 1000) for s in samples if s.kind == kind and s.ok]
        if pts:
            ax.scatter(*zip(*pts), s=6, color=colour, label=kind)
    bad = [(s.started, max(s.latency * 1000, 1)) for s in samples if not s.ok]
    if bad:
        ax.scatter(*zip(*bad), s=30, color="red", marker="x", label="failed")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the load began")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"drill {report.scenario}: recovery {report.recovery_seconds:.2f}s, failures {report.client_failures}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
