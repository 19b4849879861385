"""An edge worker's settings read from the deployment's topology file, for one named zone.

The container (and any operator) starts the worker with a zone name and the topology YAML instead of
flags: the zone gives the address, port, threads, inference workers and batching; the models of
tier "edge" give what to serve, their paths relative to the model cache. The edge imports nothing
of the gateway, so this reads the few fields it needs from the plain YAML (the gateway's schema
stays the one authority).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Topology field of a zone's `edge` endpoint -> EdgeConfig field.
ENDPOINT_FIELDS = {
    "port": "port",
    "threads": "threads",
    "workers": "workers",
    "max_batch": "max_batch",
    "max_queue_delay_ms": "max_queue_delay_ms",
    "l1_cache_entries": "l1_cache_entries",
}


@dataclass(frozen=True)
class ZoneEdge:
    """What the topology says one zone's edge worker should be."""

    zone: str
    host: str
    models: dict[str, Path]
    settings: dict[str, Any]  # EdgeConfig field -> value, only those the topology sets


def zone_edge(topology: Path, zone: str, cache_dir: Path) -> ZoneEdge:
    """The edge worker of `zone` in the topology file, with model paths resolved against `cache_dir`."""
    raw = yaml.safe_load(Path(topology).read_text()) or {}
    zones = {z.get("name"): z for z in raw.get("zones", [])}
    if zone not in zones:
        raise ValueError(f"zone {zone!r} is not in {topology}; zones: {', '.join(map(str, zones)) or 'none'}")
    endpoint = zones[zone].get("edge")
    if not endpoint:
        raise ValueError(f"zone {zone!r} in {topology} has no edge endpoint")
    models = {}
    for model in raw.get("models", []):
        if model.get("tier") == "edge":
            path = Path(model.get("path") or model["name"]).expanduser()
            models[model["name"]] = path if path.is_absolute() else cache_dir / path
    settings = {ours: endpoint[theirs] for theirs, ours in ENDPOINT_FIELDS.items() if theirs in endpoint}
    return ZoneEdge(zone, str(zones[zone].get("address", "127.0.0.1")), models, settings)
