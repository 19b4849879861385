"""What the local launcher starts for a topology whose zone lists fixed `hosts`: a worker on each,
each behind its own front address of the zone's one fault proxy, and a gateway that sees them all."""

from __future__ import annotations

from pathlib import Path

import yaml

from deploy.launcher import LocalStack, resolve_topology
from deploy.settings import DEFAULT_TOPOLOGY, Settings


def stack_with(tmp_path: Path, hosts: list[str]) -> LocalStack:
    raw = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    raw["zones"][0]["edge"]["hosts"] = hosts
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = Settings.resolve(topology=str(path), var_dir=str(tmp_path / "var"))
    return LocalStack(settings, resolve_topology(settings), fault_proxies=True)


def test_a_worker_on_each_host_behind_the_zone_s_proxy(tmp_path):
    stack = stack_with(tmp_path, ["127.0.1.1", "127.0.1.3"])
    stack.children = stack.plan()
    edges = stack.replicas("zone-a", "edge")
    assert [c.name for c in edges] == ["zone-a-edge", "zone-a-edge-2"]
    assert [c.argv[c.argv.index("--host") + 1] for c in edges] == ["127.0.1.1", "127.0.1.3"]
    assert [c.name for c in stack.replicas("zone-b", "edge")] == ["zone-b-edge"]
    proxy = stack.child("zone-a-proxy").argv
    forwards = [proxy[i + 1] for i, a in enumerate(proxy) if a == "--forward"]
    assert forwards == ["tcp:127.0.1.2:50051=127.0.1.1:50051", "tcp:127.0.1.4:50051=127.0.1.3:50051",
                        "tcp:127.0.1.2:8001=127.0.1.1:8001"]
    seen = stack.gateway_topology().zones[0]
    assert seen.address == "127.0.1.2" and seen.edge.hosts == ["127.0.1.2", "127.0.1.4"]


def test_without_hosts_a_zone_has_one_worker_on_its_address(tmp_path):
    stack = stack_with(tmp_path, [])
    stack.children = stack.plan()
    assert [c.name for c in stack.replicas("zone-a", "edge")] == ["zone-a-edge"]
    assert stack.gateway_topology().zones[0].edge.hosts == []
