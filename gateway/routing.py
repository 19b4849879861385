"""Which zone answers: the client's region, then zones ranked by health, locality and latency.

Ranking, best first: endpoints that are available (healthy and not ejected) before the rest;
among those, unsaturated before saturated (locality-weighted spill-over: the nearest zone takes the
traffic until it is full); then the lowest expected cost, the fibre distance from the client's
region plus the probe round trip's peak EWMA (so a slow zone loses its traffic, and wins it back
as its probes speed up).
"""

from __future__ import annotations

import math
import random

from gateway.config import Model, Region, Tier, Topology
from gateway.http import Request
from gateway.upstreams import Endpoint, UpstreamPool

EARTH_RADIUS_KM = 6371.0
_IP_MEMO = 65536  # client addresses remembered before the memo starts over


def distance_km(a: Region, b: Region) -> float:
    """Great-circle distance between two regions (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a.lat, a.lon, b.lat, b.lon))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


class Router:
    """Ranks a tier's endpoints for one request."""

    def __init__(self, topology: Topology, pool: UpstreamPool, rng: random.Random | None = None) -> None:
        self._topology = topology
        self._pool = pool
        # Distances are fixed by the topology: worked out once, not per request.
        km_per_ms = pool.config.km_per_ms
        self._distance_ms = {
            (region.name, zone.name): distance_km(region, topology.region(zone.region)) / km_per_ms
            for region in topology.regions
            for zone in topology.zones
        }
        self._rng = rng or random.Random()
        # Client addresses repeat (one per connection): each is looked up in the CIDR table once.
        self._by_ip: dict[str, Region | None] = {}

    def client_region(self, request: Request) -> Region | None:
        """The trusted load-balancer header, else the CIDR table, else the gateway's own region."""
        named = request.headers.get(self._topology.gateway.region_header)
        if named:
            region = self._topology.region(named.strip())
            if region is not None:
                return region
        ip = request.client_ip
        if ip not in self._by_ip:
            if len(self._by_ip) >= _IP_MEMO:
                self._by_ip.clear()
            found = next((r for r in self._topology.regions if r.contains(ip)), None)
            self._by_ip[ip] = found or self._topology.region(self._topology.gateway.region)
        return self._by_ip[ip]

    def rank(self, tier: Tier, region: Region | None) -> list[Endpoint]:
        """Every endpoint of `tier`, best first."""
        origin = region.name if region else ""

        def key(endpoint: Endpoint) -> tuple[bool, bool, float]:
            cost = self._distance_ms.get((origin, endpoint.zone), 0.0) + endpoint.rtt.value * 1000.0
            return (not endpoint.available(), endpoint.saturated(), cost)

        return sorted(self._pool.for_tier(tier), key=key)

    def version(self, model: Model) -> str:
        """The model version for one request, by the canary weights."""
        versions = model.versions
        if len(versions) == 1:
            return versions[0].name
        total = sum(v.weight for v in versions)
        pick = self._rng.uniform(0, total)
        for v in versions:
            pick -= v.weight
            if pick <= 0:
                return v.name
        return versions[-1].name
