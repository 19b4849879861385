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


def test_each_triton_names_its_shared_memory_for_itself_and_its_leftovers_are_removed(tmp_path):
    from core.triton.server import TritonServerSpec, remove_stale_shm_regions

    a = TritonServerSpec(tmp_path, host="127.0.51.2", http_port=8000)
    b = TritonServerSpec(tmp_path, host="127.0.51.4", http_port=8000)
    assert a.shm_prefix != b.shm_prefix and "/" not in a.shm_prefix
    for name in (f"{a.shm_prefix}1f2e", f"{a.shm_prefix}9abc", f"{b.shm_prefix}1f2e", "triton_python_backend_shm_region_x"):
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_shm_regions(a, shm_dir=tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{b.shm_prefix}1f2e", "triton_python_backend_shm_region_x"])


def test_the_tritons_of_a_stack_use_shared_memory_names_of_their_own(tmp_path):
    stack = stack_with(tmp_path, [])
    stack.children = stack.plan()
    cores = stack.replicas("zone-a", "core") + stack.replicas("zone-b", "core")
    flags = [next(a for a in c.argv if a.startswith("--backend-config=python,shm-region-prefix-name=")) for c in cores]
    assert len(cores) == 2 and len(set(flags)) == 2
    assert all(c.cleanup is not None for c in cores)
