"""Which zone answers: the client's region, then zones ranked by health and distance from it."""

from __future__ import annotations

import math

from gateway.config import Region, Tier, Topology
from gateway.http import Request
from gateway.upstreams import Endpoint, UpstreamPool

EARTH_RADIUS_KM = 6371.0


def distance_km(a: Region, b: Region) -> float:
    """Great-circle distance between two regions (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a.lat, a.lon, b.lat, b.lon))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


class Router:
    """Ranks a tier's endpoints for one request."""

    def __init__(self, topology: Topology, pool: UpstreamPool) -> None:
        self._topology = topology
        self._pool = pool
        self._zone_region = {z.name: topology.region(z.region) for z in topology.zones}

    def client_region(self, request: Request) -> Region | None:
        """The trusted load-balancer header, else the CIDR table, else the gateway's own region."""
        named = request.headers.get(self._topology.gateway.region_header)
        if named:
            region = self._topology.region(named.strip())
            if region is not None:
                return region
        for region in self._topology.regions:
            if region.contains(request.client_ip):
                return region
        return self._topology.region(self._topology.gateway.region)

    def rank(self, tier: Tier, region: Region | None) -> list[Endpoint]:
        """Healthy endpoints first, then the nearest to `region`, then the least loaded."""

        def key(endpoint: Endpoint) -> tuple[bool, float, int]:
            zone_region = self._zone_region.get(endpoint.zone)
            dist = distance_km(region, zone_region) if region and zone_region else 0.0
            return (not endpoint.healthy, dist, endpoint.in_flight)

        return sorted(self._pool.for_tier(tier), key=key)
