"""`meridian drill`: a local multi-zone stack behind fault proxies, steady load, one fault, a report.

Several scenarios share one stack; each leaves it healthy again for the next. Every scenario
writes `<name>.json`, `<name>.txt` and `<name>.png`; the command's last line is the path of the
JSON report (of the summary when several scenarios ran).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import yaml

from deploy.drills import report as rpt
from deploy.drills.load import EMBED_MODEL, TIER_OF_KIND, LoadGenerator, Rates, Sample, stream_text
from deploy.drills.scenarios import SCENARIOS, Context, Scenario, wait_ready
from deploy.launcher import LocalStack, StackError, free_port, resolve_topology
from deploy.settings import Settings
from gateway.config import ConfigError, load_topology


# Below this share of the requests before the fault, the zone struck was not carrying the load.
MIN_ZONE_SHARE = 0.5
# A zone that keeps its traffic through a fault ("stays") serves at most this much less of it during.
MAX_STAY_LOSS = 0.1
# A replica thawed after a freeze takes requests again within this many seconds (its probes answer
# within a probe interval; an ejection it earned while frozen may last a few seconds more).
REJOIN_BOUND_S = 10.0
SERVING_REPLICAS = "meridian_upstream_serving_replicas"
# The stream a fault strikes has this many tokens to come at least: time for a replica fault to
# find the server generating it (its gauges refresh every 50 ms) while it still is.
STRIKE_TOKENS_LEFT = 8


class DrillError(Exception):
    """The drill could not run (a bad topology file, the stack did not start); the message says why."""


@dataclass(frozen=True)
class Timing:
    before_s: float = 4.0
    during_s: float = 5.0
    after_s: float = 4.0


def drill_settings(var_dir: Path, topology_path: Path | None, edge_replicas: int = 1,
                   core_replicas: int = 1) -> Settings:
    """A private copy of the local topology: its own loopback addresses and free ports, and each
    zone's edge on `edge_replicas` workers at least and its core on `core_replicas` servers (their
    `hosts`; each one's fault proxy on the next address)."""
    from deploy.settings import DEFAULT_TOPOLOGY

    source = topology_path or DEFAULT_TOPOLOGY
    try:
        topology = load_topology(source)  # checked whole first, so the edits below find their keys
    except ConfigError as exc:
        raise DrillError(" ".join(str(exc).split())) from None  # YAML errors span lines
    if not topology.zones:
        raise DrillError(f"{source}: no zones to drill")
    raw = yaml.safe_load(source.read_text())
    gateway = raw.setdefault("gateway", {})
    gateway.setdefault("http1", {})["port"] = free_port()
    gateway.setdefault("http3", {})["port"] = free_port(socket.SOCK_DGRAM)
    gateway["https"] = {"host": "127.0.0.1", "port": 0}
    raw.setdefault("redis", {})["port"] = free_port()
    for i, (zone, parsed) in enumerate(zip(raw["zones"], topology.zones)):
        zone["address"] = f"127.0.{51 + 2 * i}.1"
        for part, wanted in (("edge", edge_replicas), ("core", core_replicas)):
            endpoint = getattr(parsed, part)
            servers = max(wanted, len(endpoint.hosts)) if endpoint is not None else 1
            if servers > 1:
                zone[part].pop("host", None)
                zone[part]["hosts"] = [f"127.0.{51 + 2 * i}.{1 + 2 * j}" for j in range(servers)]
    var_dir.mkdir(parents=True, exist_ok=True)
    path = var_dir / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Settings.resolve(topology=str(path), var_dir=str(var_dir))


async def run_drills(names: list[str], out_dir: Path, timing: Timing, rates: Rates,
                     topology_path: Path | None = None) -> list[rpt.DrillReport]:
    """Start the stack, run each scenario in turn, stop the stack."""
    settings = drill_settings(out_dir / "stack", topology_path, max(SCENARIOS[n].edge_replicas for n in names),
                              max(SCENARIOS[n].core_replicas for n in names))
    topology = resolve_topology(settings)
    stack = LocalStack(settings, topology, fault_proxies=True)
    core_model = next((m.name for m in topology.models if m.tier == "core"), None)
    if core_model is None:
        raise DrillError(f"{settings.topology}: no core model to drill")
    print(f"starting a drill stack ({len(topology.zones)} zones behind fault proxies) ...", flush=True)
    reports = []
    interrupted = _stop_on_signals()
    starting = None
    try:
        # Inside the try: a part that started before another failed must be stopped too.
        starting = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(stack.start, 240.0, lambda m: print(m, flush=True), should_stop=interrupted.is_set))
        await asyncio.shield(starting)  # a cancel must not mark it done while its thread still starts things
        await warm_up(stack.http_url, settings.api_key, core_model, [r.name for r in topology.regions])
        target = await nearest_zone(stack.http_url, settings.api_key, topology.zones[0].name)
        print(f"faults hit {target}, the zone serving the load", flush=True)
        for name in names:
            scenario = SCENARIOS[name]
            ctx = Context(stack, target)
            try:
                report = await run_one(ctx, scenario, timing, rates, core_model, settings.api_key, out_dir)
            except Exception:
                # The drill's own machinery broke (not the stack under test): say so, loudly.
                traceback.print_exc()
                print(f"drill {name}: ERROR in the drill itself (traceback above)", flush=True)
                # CI keeps no stack files: the gateway's last words go with the error.
                gateway = stack.child("gateway")
                print(f"the end of {gateway.log_path}:", gateway.log_tail(40), sep="\n", flush=True)
                raise
            print(report.to_text(), flush=True)
            reports.append(report)
            await scenario.restore(ctx)
    finally:
        if starting is not None:
            await asyncio.wait({starting})  # a start cut short by a signal ends first: nothing starts after the stop
            if not starting.cancelled():
                starting.exception()  # read: a start aborted by the signal is no error to report
        await asyncio.to_thread(stack.stop)
    return reports


def _stop_on_signals() -> threading.Event:
    """SIGINT or SIGTERM cancels the drills, whose `finally` stops the stack (its Tritons' stubs
    included, which no parent-death signal reaches); the event stops a startup in progress."""
    interrupted, task, loop = threading.Event(), asyncio.current_task(), asyncio.get_running_loop()

    def stop() -> None:
        interrupted.set()
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    return interrupted


async def run_one(ctx: Context, scenario: Scenario, timing: Timing, rates: Rates, core_model: str,
                  api_key: str, out_dir: Path) -> rpt.DrillReport:
    """One scenario under load; writes its report files."""
    stack = ctx.stack
    print(f"drill {scenario.name}: setting up", flush=True)
    if await wait_all_serving(stack, timeout=180) is None:
        raise DrillError(f"{scenario.name}: the gateway did not count every replica as serving within 180s")
    await scenario.setup(ctx)
    during = scenario.during_s or timing.during_s
    load = LoadGenerator(stack.http_url, api_key, core_model, rates)
    metrics_before = await scrape(stack.http_url)
    # The load generator times requests from this process: a full collection of its heap
    # (matplotlib's, once a plot was drawn: 45 ms here) would show as a slow answer.
    gc.collect()
    gc.freeze()
    load.begin()
    task = asyncio.create_task(load.run(timing.before_s + during + timing.after_s))
    await _until(load, timing.before_s)
    give_up = load.now() + 2.0
    struck = ctx.zone if scenario.hits_zone else None
    while not _time_to_strike(load, struck) and load.now() < give_up:
        await asyncio.sleep(0.005)
    fault_at = load.now()
    print(f"drill {scenario.name}: fault at {fault_at:.1f}s", flush=True)
    await scenario.inject(ctx)
    await _until(load, timing.before_s + during)
    fault_end = load.now()
    await scenario.clear(ctx)
    rejoin = asyncio.create_task(wait_all_serving(stack, REJOIN_BOUND_S)) if scenario.rejoins else None
    samples = await task
    metrics_after = await scrape(stack.http_url)
    if scenario.name != "kill-zone":  # the killed zone stays down until restore()
        await wait_ready(stack, timeout=180)
    identical, compared = await check_streams(stack.http_url, api_key, samples)
    report = summarise(scenario, ctx.zone, samples, fault_at, fault_end, metrics_before, metrics_after,
                       identical, compared)
    if scenario.measure == "return":
        report.return_seconds = _return_seconds(ctx, load, samples)
    if rejoin is not None:
        report.rejoin_seconds = await rejoin
    _judge(report, scenario)  # again, with what was measured after the samples
    write(report, samples, out_dir)
    return report


def _time_to_strike(load: LoadGenerator, zone: str | None) -> bool:
    """Whether a stream is mid-flight in the zone struck, so that resumption is part of every
    drill: not one the ranking sent to the other zone (it would finish untouched), one a few
    chunks in (a sampled stream that ends at its second token is over before the fault lands),
    with tokens still to come, and with no completion in flight. A replica fault strikes the core
    its gauges show busy: beside a completion, that may be the completion's, done before the
    fault lands (the schedules start together, so one begins with every other stream), and then
    nothing struck was in flight."""
    return (load.streams_in_flight(zone, min_chunks=3, min_left=STRIKE_TOKENS_LEFT) > 0
            and load.in_flight("complete") == 0)


def stack_replicas(stack: LocalStack) -> int:
    """The edge workers and core servers of every zone: the replicas the gateway should count."""
    return sum(len(zone.replica_hosts(part)) for zone in stack.topology.zones for part in ("edge", "core")
               if getattr(zone, part) is not None)


async def wait_all_serving(stack: LocalStack, timeout: float) -> float | None:
    """Seconds until the gateway counts every replica of the stack as taking requests; None when
    it did not within `timeout`. A zone is ready with one replica up, so a replica started again
    (a killed Triton loads for many seconds here) can still be loading when /readyz says 200."""
    start = time.monotonic()
    wanted = stack_replicas(stack)
    while time.monotonic() - start <= timeout:
        if (await scrape(stack.http_url)).get(SERVING_REPLICAS, 0.0) >= wanted:
            return round(time.monotonic() - start, 3)
        await asyncio.sleep(0.1)
    return None


async def _until(load: LoadGenerator, t: float) -> None:
    while load.now() < t:
        await asyncio.sleep(0.02)


def summarise(scenario: Scenario, zone: str, samples: list[Sample], fault_at: float, fault_end: float,
              before: dict, after: dict, identical: bool, compared: int) -> rpt.DrillReport:
    """The report's numbers from the samples and the gateway's counters."""
    base = rpt.baselines(samples, fault_at)
    struck = zone if scenario.hits_zone else ""  # Redis: every request met the fault
    end = max((s.started for s in samples), default=fault_end) + 1
    failures = [s for s in samples if not s.ok]
    r = rpt.DrillReport(
        scenario=scenario.name,
        fault_at=round(fault_at, 3),
        fault_end=round(fault_end, 3),
        client_failures=len(failures),
        requests=len(samples),
        recovery_seconds=round(rpt.recovery_seconds(samples, fault_at, base, fault_end, struck), 3),
        p50_ms_before=rpt.percentile(rpt.phase(samples, 0, fault_at), 50),
        p99_ms_before=rpt.percentile(rpt.phase(samples, 0, fault_at), 99),
        p50_ms_during=rpt.percentile(rpt.phase(samples, fault_at, fault_end), 50),
        p99_ms_during=rpt.percentile(rpt.phase(samples, fault_at, fault_end), 99),
        p50_ms_after=rpt.percentile(rpt.phase(samples, fault_end, end), 50),
        p99_ms_after=rpt.percentile(rpt.phase(samples, fault_end, end), 99),
        retries=_delta(before, after, "meridian_retries_total"),
        streams=sum(1 for s in samples if s.kind == "stream"),
        streams_resumed=_delta(before, after, "meridian_streams_resumed_total"),
        streams_token_identical=identical,
        streams_compared=compared,
        replica_moves=_delta(before, after, "meridian_replica_moves_total"),
        bound_seconds=scenario.bound_s,
        failures=[f"{s.kind} at {s.started:.2f}s: {s.status} {s.error}" for s in failures],
    )
    if scenario.hits_zone:
        r.zone, r.zone_tier = zone, scenario.struck_tier
        r.zone_share_before = zone_share(samples, zone, fault_at, tier=r.zone_tier)
        r.zone_share_during = zone_share(samples, zone, fault_end, since=fault_at, tier=r.zone_tier)
    if scenario.measure == "shift" or scenario.leaves_zone:
        r.shift_seconds = rpt.first_time(samples, fault_at, lambda s: bool(s.zone) and s.zone != zone)
    _judge(r, scenario)
    return r


def busiest_zone(samples: list[Sample]) -> str | None:
    """The zone that answered most of these requests (None when none said which zone served it)."""
    served = Counter(s.zone for s in samples if s.ok and s.zone)
    return served.most_common(1)[0][0] if served else None


def zone_share(samples: list[Sample], zone: str, until: float, since: float = 0.0,
               tier: str | None = None) -> float | None:
    """The share of the answers (of `tier`'s requests, or all) started from `since` and finished
    before `until` that `zone` served (None: no answer named a zone)."""
    done = [s for s in samples if s.ok and s.zone and s.started >= since and s.started + s.latency < until
            and (tier is None or TIER_OF_KIND[s.kind] == tier)]
    return sum(1 for s in done if s.zone == zone) / len(done) if done else None


def _judge(r: rpt.DrillReport, scenario: Scenario) -> None:
    """Pass or fail, with a reason for each check missed."""
    problems = []
    if r.client_failures:
        problems.append(f"{r.client_failures} client request(s) failed")
    if not r.streams_token_identical:
        problems.append("a resumed stream differs from an undisturbed run of it")
    if scenario.measure in ("recovery", "stays") and r.recovery_seconds > scenario.bound_s:
        problems.append(f"recovery took {r.recovery_seconds:.2f}s (bound {scenario.bound_s:.1f}s)")
    if scenario.measure == "stays" and not _stayed(r):
        during = "none" if r.zone_share_during is None else f"{r.zone_share_during:.0%}"
        what = f"{r.zone_tier} traffic" if r.zone_tier else "traffic"
        problems.append(f"{what} left {r.zone} during the fault (it served {during} of the answers then)")
    elif scenario.measure == "shift" and (r.shift_seconds is None or r.shift_seconds > scenario.bound_s):
        problems.append(f"traffic did not leave {r.zone} within {scenario.bound_s:.1f}s")
    elif scenario.measure == "return" and (r.return_seconds is None or r.return_seconds > scenario.bound_s):
        problems.append(f"traffic did not come back to {r.zone} within {scenario.bound_s:.1f}s")
    # A fault on a zone that carried no traffic proves nothing, however clean the numbers are.
    # (A zone taken down before the load starts has no "before" share to check.)
    if scenario.hits_zone and not scenario.needs_zone_down_first:
        share = r.zone_share_before
        if share is None or share < MIN_ZONE_SHARE:
            served = "no answer named its zone" if share is None else f"{r.zone} served {share:.0%} of them"
            problems.append(f"the fault hit {r.zone} but it was not carrying the load before the fault ({served})")
    if scenario.rejoins and r.rejoin_seconds is None:
        problems.append(f"the replica struck did not take requests again within {REJOIN_BOUND_S:.0f}s of the thaw")
    if scenario.leaves_zone and (r.shift_seconds is None or r.shift_seconds >= r.fault_end - r.fault_at):
        problems.append(f"traffic never left {r.zone} during the fault")
    r.problems = problems
    r.passed = not problems


def _stayed(r: rpt.DrillReport) -> bool:
    """The zone served about as much of the traffic during the fault as before it."""
    if r.zone_share_during is None or r.zone_share_before is None:
        return False
    return r.zone_share_during >= r.zone_share_before - MAX_STAY_LOSS


def _return_seconds(ctx: Context, load: LoadGenerator, samples: list[Sample]) -> float | None:
    if ctx.returned_at is None:
        return None
    since = ctx.returned_at - load._t0
    return rpt.first_time(samples, since, lambda s: s.zone == ctx.zone, window=1)


async def warm_up(base_url: str, api_key: str, core_model: str, regions: list[str]) -> None:
    """A few requests of each kind into every region's zone: a zone's first answers are slow
    (lazy initialisation), and that must not count as the fault's doing."""
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", "cache-control": "no-cache"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as session:
        for region in regions:
            for i in range(3):
                for sample in (
                    Sample("embed", 0.0, body={"model": "all-minilm-l6-v2", "input": [f"warm {i}"]}),
                    Sample("stream", 0.0, body={"model": core_model, "prompt": f"warm {i}", "max_tokens": 8,
                                                "temperature": 0.5, "seed": i, "stream": True}),
                ):
                    if sample.kind == "embed":
                        async with session.post(base_url + "/v1/embeddings", data=json.dumps(sample.body),
                                                headers={"x-meridian-region": region}) as r:
                            await r.read()
                    else:
                        await stream_text(session, base_url, sample, headers={"x-meridian-region": region})


async def nearest_zone(base_url: str, api_key: str, fallback: str, n: int = 10) -> str:
    """The zone serving requests sent like the load's (no region header): the one faults must hit."""
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", "cache-control": "no-cache"}
    probes = []
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(n):
            body = {"model": EMBED_MODEL, "input": [f"which zone {i}"]}  # the load's own embeddings
            async with session.post(base_url + "/v1/embeddings", data=json.dumps(body)) as r:
                await r.read()
                probes.append(Sample("embed", 0.0, ok=r.status == 200, zone=r.headers.get("x-meridian-zone", "")))
    # No zone named: strike the first and let the judge's share check say it was wrong.
    return busiest_zone(probes) or fallback


async def check_streams(base_url: str, api_key: str, samples: list[Sample]) -> tuple[bool, int]:
    """Each resumed stream against an undisturbed run of the same request (same seed, cache bypassed).

    Only resumed streams are the claim: a stream that never moved can still differ from a solo run
    in rare cases, when a different batch composition changes a GEMM's last bits and a near-tied
    expert choice turns that into another token (see the closing notes on batch invariance).
    """
    streams = [s for s in samples if s.kind == "stream" and s.ok and s.resumed]
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", "cache-control": "no-cache"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for s in streams:
            ref = Sample("stream", 0.0, body=s.body)
            for _ in range(3):  # the reference run is ours, not the drill's: a transport hiccup is retried
                try:
                    await stream_text(session, base_url, ref)
                    break
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    print(f"reference stream failed, retrying: {exc}", file=sys.stderr, flush=True)
            if not ref.ok or ref.text != s.text:
                return False, len(streams)
    return True, len(streams)


async def scrape(base_url: str) -> dict[str, float]:
    """Sum of each counter family of the gateway's /metrics."""
    for attempt in range(3):
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.get(base_url + "/metrics") as r:
                    text = await r.text()
            break
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            if attempt == 2:
                raise
            await asyncio.sleep(0.5)
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    return totals


def _delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def write(report: rpt.DrillReport, samples: list[Sample], out_dir: Path) -> Path:
    """<scenario>.json, .txt, .png and the raw samples."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{report.scenario}.json"
    path.write_text(report.to_json())
    (out_dir / f"{report.scenario}.txt").write_text(report.to_text() + "\n")
    (out_dir / f"{report.scenario}.samples.json").write_bytes(msgspec.json.encode(samples))
    rpt.plot(samples, report, out_dir / f"{report.scenario}.png")
    return path


def main(names: list[str], out: str | None, timing: Timing, rates: Rates, topology: str | None) -> int:
    """Run the drills; exit 1 when any failed a check, or the drill could not run (one line, no traceback)."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
        return 2
    out_dir = Path(out or f"var/drills/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    try:
        reports = asyncio.run(run_drills(names, out_dir, timing, rates, Path(topology) if topology else None))
    except (DrillError, StackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:  # SIGINT or SIGTERM (`_stop_on_signals`)
        print("interrupted: the drill stack was stopped", file=sys.stderr)
        return 130
    if len(reports) == 1:
        path = out_dir / f"{reports[0].scenario}.json"
    else:
        path = out_dir / "summary.json"
        path.write_text(json.dumps({"passed": all(r.passed for r in reports),
                                    "drills": [json.loads(r.to_json()) for r in reports]}, indent=2))
    print(path)
    return 0 if all(r.passed for r in reports) else 1
