"""The topology file as one typed object: regions, zones, models, auth, limits and listeners.

One YAML file describes a deployment. The gateway reads it; the local launcher starts what it
lists. Everything configurable lives here, loaded once and passed down.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

Tier = Literal["edge", "core"]
ModelKind = Literal["embedding", "generate"]


class Listener(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 0


class TLS(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cert: str = "var/tls/cert.pem"
    key: str = "var/tls/key.pem"
    # The files are looked at this often and reloaded when they change (a rotated secret); 0: never.
    reload_interval_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0


class GatewayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    region: str = ""
    http1: Listener = Listener(port=8080)
    http3: Listener = Listener(port=8443)
    # HTTP/1.1 over TLS (the mobile SDK's fallback when UDP is blocked); port 0 turns it off.
    https: Listener = Listener(port=0)
    tls: TLS = TLS()
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16384
    max_headers: int = 100
    # Concurrent requests one QUIC connection may have open.
    max_streams_per_connection: int = 100
    # Open connections each listener (HTTP/3, HTTP/1.1) holds; one more is refused at once (QUIC
    # CONNECTION_REFUSED; on HTTP/1.1 a 503 and close), so that a flood of idle connections cannot
    # take the memory the served ones need. 0: no limit.
    max_connections: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    idle_timeout_s: float = 60.0
    # A client must deliver its whole request body within this time (slow clients are cut off).
    body_timeout_s: float = 15.0
    request_timeout_s: float = 120.0
    # On SIGTERM: readiness fails and new requests are refused (HTTP/3 GOAWAY; HTTP/1.1 closes its
    # socket) while those in flight, streams included, get this long to finish.
    drain_timeout_s: float = 30.0
    # The load balancer in front sets this header; it is trusted over the client address.
    region_header: str = "x-meridian-region"


class RedisConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 6390
    db: int = 0
    # Loopback Redis answers in well under a millisecond; anything slower is treated as down.
    timeout_s: float = 0.25

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    ttl_s: int = 3600
    max_entry_bytes: int = 1 << 20
    # How long identical concurrent misses wait for the first one (single flight).
    wait_s: float = 60.0
    # The in-process L1 in front of Redis: at most this many entries and bytes, each kept this
    # many seconds at most (and never longer than Redis keeps it); 0 entries turns it off.
    l1_entries: int = 10_000
    l1_max_bytes: int = 64 << 20
    l1_ttl_s: float = 5.0


class Limit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    requests_per_second: float = 0.0  # 0: unlimited
    burst: int = 0  # 0: one second's worth
    tokens_per_minute: int = 0  # 0: unlimited


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default: Limit = Limit()
    tenants: dict[str, Limit] = {}

    def for_tenant(self, tenant: str) -> Limit:
        """The tenant's own limit, else the default."""
        return self.tenants.get(tenant, self.default)


class RoutingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Active health checks, each endpoint on its own clock. A healthy endpoint's probe waits 4x
    # its round trip (the peak EWMA below), at least probe_timeout_min_s: a nearby zone that falls
    # silent is seen down within interval + 0.25 s, which keeps a blackholed zone's recovery
    # under 1 s, while a zone 150 ms away still has 600 ms to answer. A probe of an endpoint that
    # is down, or not yet measured, waits probe_timeout_s, so a zone that merely got slower is
    # measured again rather than kept down.
    probe_interval_s: float = 0.25
    probe_timeout_min_s: float = 0.25
    probe_timeout_s: float = 1.0
    # Ranking: distance counts as fibre round trips (about 100 km per millisecond), plus the
    # probe round trip's peak-EWMA, which decays with this time constant.
    km_per_ms: float = 100.0
    rtt_decay_s: float = 1.0
    # Locality spill-over: a zone with this many requests in flight per serving replica is saturated.
    zone_capacity: int = 32
    # Circuit breaker (Envoy's max_requests): a zone takes at most this many requests at once per
    # serving replica. With every zone of a tier that full, a request is refused at once (503 with
    # Retry-After) rather than queued without bound behind the others. 0: no limit.
    max_requests_per_replica: Annotated[int, msgspec.Meta(ge=0)] = 256
    # Outlier detection: consecutive failures eject an endpoint for a growing interval.
    consecutive_failures: int = 2
    base_ejection_s: float = 1.0
    max_ejection_s: float = 30.0
    # Retries in the next zone: a budget of this fraction of requests, with a floor per second.
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 10.0
    # Per-try timeouts.
    try_timeout_s: float = 10.0
    first_chunk_timeout_s: float = 30.0
    chunk_gap_timeout_s: float = 2.0
    # Hedge idempotent unary requests (embeddings) to the next zone after this delay; 0 turns it off.
    hedge_after_s: float = 0.25
    # Only requests up to this many characters of input are hedged: a larger one is slow by its own
    # work, not by its replica's trouble, and a copy would only take a second zone's model for as long.
    hedge_max_chars: Annotated[int, msgspec.Meta(ge=0)] = 16384
    # Embedding requests for one edge endpoint share RPCs under load (gateway/coalescer.py): what
    # queues while this many RPCs are out leaves together, up to this many inputs per RPC.
    embed_rpcs_in_flight: int = 2
    embed_inputs_per_rpc: int = 64
    # An edge or core named by a DNS name (a Kubernetes headless Service) is every address the
    # name resolves to, looked up again this often; requests are balanced over them (gateway/replicas.py).
    resolve_interval_s: float = 5.0


class TracingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = False
    # OTLP/HTTP traces endpoint; empty means the exporter's default (OTEL_EXPORTER_OTLP_* or localhost).
    otlp_endpoint: str = ""
    service_name: str = "meridian-gateway"
    sample_ratio: float = 1.0


class Region(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    lat: float
    lon: float
    cidrs: list[str] = []

    def contains(self, ip: str) -> bool:
        """Whether the client address falls in one of this region's networks."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(c, strict=False) for c in self.cidrs)


class EdgeEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    port: int = 50051
    # Where the gateway reaches it when not on the zone's address: on Kubernetes a headless
    # Service's name, which resolves to every ready worker of the zone.
    host: str = ""
    # Or a fixed set of workers without a name to look up: these IP addresses (each on `port`),
    # balanced over as a name's addresses are. The local launcher starts a worker on each.
    hosts: list[str] = []
    threads: int = 1  # ONNX Runtime threads per session
    workers: int = 1  # inference threads, each with its own session: batches running side by side
    # Dynamic batching of embeddings: inputs per model call, and how long a short queue may wait for company.
    max_batch: int = 32
    max_queue_delay_ms: float = 0.0  # waiting for company never paid on CPU workers: edge/config.py
    # The edge-local (L1) cache of embeddings by input; 0 turns it off.
    l1_cache_entries: int = 4096


class CoreEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    grpc_port: int = 8001
    # As the edge's: a name that resolves to several Triton servers is balanced over them, and so
    # is a fixed set of `hosts` (IP addresses).
    host: str = ""
    hosts: list[str] = []
    http_port: int = 8000
    metrics_port: int = 8002
    device: str = "cpu"
    threads: int = 1


class Zone(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    region: str
    # Each local zone binds its own loopback address so that one zone can be cut off alone.
    address: str
    edge: EdgeEndpoint | None = None
    core: CoreEndpoint | None = None

    def endpoint(self, tier: Tier) -> EdgeEndpoint | CoreEndpoint:
        """The zone's edge or core."""
        endpoint = self.edge if tier == "edge" else self.core
        assert endpoint is not None, f"zone {self.name} has no {tier}"
        return endpoint

    def replica_hosts(self, tier: Tier) -> list[str]:
        """Where the tier's processes listen: its fixed `hosts`, else its `host` or the zone's address."""
        endpoint = self.endpoint(tier)
        return list(endpoint.hosts) or [endpoint.host or self.address]


class ModelVersion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str = "1"
    weight: int = 100


class Model(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    tier: Tier
    kind: ModelKind
    # Where the launcher finds the artefact: a directory, relative to the model cache if not absolute.
    path: str = ""
    versions: list[ModelVersion] = msgspec.field(default_factory=lambda: [ModelVersion()])
    # The most tokens one request may ask for; more is a 400 before any upstream is touched.
    max_output_tokens: int = 4096


class ApiKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    tenant: str
    # Keys are stored hashed: sha256 of the key, hex.
    sha256: str
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    routes: list[str] = msgspec.field(default_factory=lambda: ["*"])
    revoked: bool = False


JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA", "HS256")


class JwtIssuer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    issuer: str
    audience: str
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    # Signing keys: a JWKS file (re-read when it changes) or URL (refetched), for rotation.
    jwks_file: str = ""
    jwks_url: str = ""
    jwks_refresh_s: float = 300.0
    # HS256 is accepted only from an issuer with a shared secret configured here.
    hs256_secret: str = ""
    tenant_claim: str = "tenant"
    leeway_s: float = 30.0
    # Scopes a token grants when its `scope` claim names none (`models:<glob>`, `routes:<glob>`).
    default_models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    default_routes: list[str] = msgspec.field(default_factory=lambda: ["*"])


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    api_keys: list[ApiKey] = []
    jwt: list[JwtIssuer] = []


class Topology(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gateway: GatewayConfig = GatewayConfig()
    redis: RedisConfig = RedisConfig()
    regions: list[Region] = []
    zones: list[Zone] = []
    models: list[Model] = []
    auth: AuthConfig = AuthConfig()
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    tracing: TracingConfig = TracingConfig()
    routing: RoutingConfig = RoutingConfig()

    def region(self, name: str) -> Region | None:
        """The region called `name`, if the topology has one."""
        return next((r for r in self.regions if r.name == name), None)

    def model(self, name: str) -> Model | None:
        """The model called `name`, if the topology serves one."""
        return next((m for m in self.models if m.name == name), None)


class ConfigError(ValueError):
    """The topology file is unreadable or inconsistent."""


def load_topology(path: str | Path) -> Topology:
    """Read and check a topology YAML file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read topology {path}: {exc}") from exc
    return parse_topology(raw or {}, source=str(path))


def parse_topology(raw: dict, *, source: str = "<topology>") -> Topology:
    """Build a Topology from plain data and check its cross references."""
    try:
        topo = msgspec.convert(raw, Topology)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    _check(topo, source)
    return topo


def _check_hosts(where: str, host: str, hosts: list[str]) -> None:
    if host:
        raise ConfigError(f"{where}: give host (a name to look up) or hosts (fixed addresses), not both")
    for h in hosts:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            raise ConfigError(f"{where}: hosts must be IP addresses; {h!r} is not (a name goes in host)") from None
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"{where}: hosts lists an address twice")


def dump_topology(topo: Topology) -> str:
    """The topology as YAML, for a resolved copy handed to child processes."""
    return yaml.safe_dump(msgspec.to_builtins(topo), sort_keys=False)


def _check(topo: Topology, source: str) -> None:
    regions = {r.name for r in topo.regions}
    for zone in topo.zones:
        if zone.region not in regions:
            raise ConfigError(f"{source}: zone {zone.name} names unknown region {zone.region}")
        for tier, endpoint in (("edge", zone.edge), ("core", zone.core)):
            if endpoint is not None and endpoint.hosts:
                _check_hosts(f"{source}: zone {zone.name} {tier}", endpoint.host, endpoint.hosts)
    if topo.gateway.region and topo.gateway.region not in regions:
        raise ConfigError(f"{source}: gateway region {topo.gateway.region} is not a listed region")
    for r in topo.regions:
        for cidr in r.cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"{source}: region {r.name}: {exc}") from exc
    for issuer in topo.auth.jwt:
        bad = set(issuer.algorithms) - set(JWT_ALGORITHMS)
        if bad:
            raise ConfigError(f"{source}: issuer {issuer.issuer}: algorithms {sorted(bad)} are not allowed")
        if "HS256" in issuer.algorithms and not issuer.hs256_secret:
            raise ConfigError(f"{source}: issuer {issuer.issuer}: HS256 needs hs256_secret")
        if set(issuer.algorithms) - {"HS256"} and not (issuer.jwks_file or issuer.jwks_url):
            raise ConfigError(f"{source}: issuer {issuer.issuer}: asymmetric algorithms need jwks_file or jwks_url")
    names = [m.name for m in topo.models]
    if len(names) != len(set(names)):
        raise ConfigError(f"{source}: model names must be unique")
    for m in topo.models:
        # Canary versions are Triton model versions; an edge worker serves one version of a model.
        if m.tier == "edge" and len(m.versions) > 1:
            raise ConfigError(f"{source}: model {m.name}: versions (canary weights) apply to core models only")
