"""Prometheus metrics: counters, gauges and histograms with labels, and the text exposition.

Small on purpose: an observation is a dict lookup and a few additions on the event loop's
thread, with no locks, because the gateway's budget per request is a few hundred microseconds.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _fmt_labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = name, help, labels

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def get(self, *label_values: str) -> float:
        return self.values.get(label_values, 0.0)

    def set_total(self, *label_values: str, value: float) -> None:
        """The count of something counted elsewhere, read when scraped."""
        self.values[label_values] = value

    def expose(self) -> Iterable[str]:
        yield from self.header()
        for lv, v in self.values.items():
            yield f"{self.name}{_fmt_labels(self.labels, lv)} {_num(v)}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, *label_values: str, value: float) -> None:
        self.values[label_values] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # per bucket counts, then sum, then count

    def observe(self, value: float, *label_values: str) -> None:
        s = self.series.get(label_values)
        if s is None:
            s = self.series[label_values] = [0.0] * (len(self.buckets) + 3)
        s[bisect.bisect_left(self.buckets, value)] += 1
        s[-2] += value
        s[-1] += 1

    def expose(self) -> Iterable[str]:
        yield from self.header()
        for lv, s in self.series.items():
            cumulative = 0.0
            for i, bound in enumerate((*self.buckets, math.inf)):
                cumulative += s[i]
                le = 'le="' + _num(bound) + '"'
                yield f"{self.name}_bucket{_fmt_labels(self.labels, lv, le)} {_num(cumulative)}"
            yield f"{self.name}_sum{_fmt_labels(self.labels, lv)} {_num(s[-2])}"
            yield f"{self.name}_count{_fmt_labels(self.labels, lv)} {_num(s[-1])}"


class Metrics:
    """Every metric the gateway publishes at /metrics."""

    def __init__(self) -> None:
        self.requests = Counter("meridian_requests_total", "Requests answered.", ("route", "tier", "zone", "status"))
        self.latency = Histogram("meridian_request_seconds", "Time to the answer's headers.", ("route", "tier", "zone"))
        self.cache = Counter("meridian_cache_total", "L2 cache lookups by result.", ("result",))
        self.upstream_errors = Counter("meridian_upstream_errors_total", "Failed upstream calls.", ("zone", "tier"))
        self.retries = Counter(
            "meridian_retries_total",
            "Calls sent again: retried in another zone (by tier), or hedged (hedge: the next zone, hedge_in_zone: "
            "another replica of the zone).",
            ("tier",),
        )
        self.resumed = Counter("meridian_streams_resumed_total", "Streams resumed in another zone.", ("tier",))
        self.ejections = Counter("meridian_ejections_total", "Endpoints ejected by outlier detection.", ("zone", "tier"))
        self.overflow = Counter(
            "meridian_overflow_total", "Requests refused because every zone of the tier was at its limit (503).", ("tier",)
        )
        self.rate_limited = Counter("meridian_rate_limited_total", "Requests refused by a tenant limit.", ("tenant", "limit"))
        self.limiter_fallback = Gauge("meridian_ratelimit_local_fallback", "1 while Redis is unreachable and limits are local.")
        self.upstream_healthy = Gauge("meridian_upstream_healthy", "1 when the endpoint passed its last check.", ("zone", "tier"))
        self.upstream_replicas = Gauge("meridian_upstream_serving_replicas", "The endpoint's replicas taking requests (serving, not ejected).", ("zone", "tier"))
        self.replica_moves = Counter(
            "meridian_replica_moves_total", "Requests and streams sent on to another replica of their zone.", ("zone", "tier")
        )
        self.replica_ejections = Counter(
            "meridian_replica_ejections_total", "Replicas ejected by outlier detection (their requests stalled).", ("zone", "tier")
        )
        self._all = [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        lines: list[str] = []
        for metric in self._all:
            lines.extend(metric.expose())
        return ("\n".join(lines) + "\n").encode()
