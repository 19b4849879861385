"""The Kubernetes manifests build with kustomize, pass strict schema validation, and say what our
processes understand (the topology parses; each container's command, its image's entrypoint and
the manifest's args, is one our CLI accepts)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import server as gateway_server
from gateway.config import Topology, parse_topology
from tests.support.dockerfile import KINDS, dockerfile, exec_form

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_strict_schema_validation(manifests, tmp_path):
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if validate is None:
        pytest.skip("kubernetes-validate is not installed")
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(manifests))
    result = subprocess.run([validate, "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def configmap_topology(manifests: list[dict]) -> Topology:
    cm = next(m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("meridian-topology"))
    return parse_topology(yaml.safe_load(cm["data"]["topology.yaml"]))


def test_topology_configmap_parses(manifests):
    topo = configmap_topology(manifests)
    services = {m["metadata"]["name"] for m in manifests if m["kind"] == "Service"}
    for zone in topo.zones:
        assert zone.edge.host in services and zone.core.host in services
    assert topo.redis.host in services


def _commands(manifests: list[dict]) -> list[tuple[dict, dict, list[str]]]:
    """(Deployment, container, the command it runs) for each of our containers: its image's
    ENTRYPOINT (from our Dockerfile of that image) followed by the manifest's args."""
    out = []
    for m in manifests:
        if m["kind"] != "Deployment":
            continue
        container = m["spec"]["template"]["spec"]["containers"][0]
        image = container["image"].split(":")[0]
        if not image.startswith("meridian/"):
            continue
        path = dockerfile(image.removeprefix("meridian/"))
        assert path.is_file(), f"{m['metadata']['name']} runs {image}, which no Dockerfile builds"
        out.append((m, container, exec_form(path, "ENTRYPOINT") + container.get("args", [])))
    return out


def test_every_image_of_ours_has_a_dockerfile_and_its_command_parses(manifests):
    from deploy import cli
    from edge.server import parse_args as edge_args

    kinds = set()
    for _, _, command in _commands(manifests):
        assert command[0] == "meridian", command
        kind = command[1]
        kinds.add(kind)
        if kind == "edge":
            assert edge_args(command[2:]).port == 50051
        elif kind == "core":
            parsed = cli._parser().parse_args(command[1:])  # an unknown flag is SystemExit
            assert parsed.device == "cuda" and parsed.workdir == "/var/run/meridian"
        elif kind == "gateway":
            parsed = gateway_server.parser().parse_args(command[2:])
            assert parsed.region in {r.name for r in configmap_topology(manifests).regions}
        else:
            pytest.fail(f"unknown process {command}")
    assert kinds == set(KINDS)


def test_edge_pods_serve_the_models_their_image_carries(manifests):
    # The edge image holds its models under /models/edge: a volume mounted over them would hide them.
    from edge.server import parse_args as edge_args

    for m, container, command in _commands(manifests):
        if command[1] != "edge":
            continue
        models = [str(path) for path in edge_args(command[2:]).models.values()]
        assert models and all(path.startswith("/models/edge/") for path in models), m["metadata"]["name"]
        mounts = [v["mountPath"].rstrip("/") for v in container.get("volumeMounts", [])]
        assert not any(path.startswith(mount + "/") for path in models for mount in mounts), mounts


def _pre_stop_seconds(container: dict) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def test_grace_periods_outlast_preStop_and_the_drain(manifests):
    # SIGKILL at the end of the grace period must not cut what the drain is still finishing.
    from edge.server import parse_args as edge_args

    topo = configmap_topology(manifests)
    for m, container, command in _commands(manifests):
        if command[1] == "gateway":
            drain = topo.gateway.drain_timeout_s
        elif command[1] == "edge":
            config = edge_args(command[2:])
            drain = config.drain_grace_s + config.drain_timeout_s
        else:
            continue
        grace = m["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > _pre_stop_seconds(container) + drain, m["metadata"]["name"]


def test_gateways_reach_every_pod_of_a_zone_through_a_headless_service(manifests):
    # A gateway holds one HTTP/2 connection per address: behind a cluster IP, all of its requests
    # for a zone would go to one pod. Headless, the name resolves to every ready pod.
    topo = configmap_topology(manifests)
    services = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}
    deployments = [m for m in manifests if m["kind"] == "Deployment"]
    for zone in topo.zones:
        for tier, host in (("edge", zone.edge.host), ("core", zone.core.host)):
            spec = services[host]["spec"]
            assert spec.get("clusterIP") == "None", host
            assert not spec.get("publishNotReadyAddresses"), "a pod that is not ready must not be resolved"
            (pods,) = [d for d in deployments if spec["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            if tier == "edge":
                assert pods["spec"]["replicas"] > 1
                # Gateways must know a new pod before the rollout stops an old one (CoreDNS caches 5 s).
                assert pods["spec"].get("minReadySeconds", 0) > topo.routing.resolve_interval_s + 5


def test_each_zone_s_cores_read_checkpoints_from_a_volume_of_their_own_zone(manifests):
    # A volume lives in one zone (or region): zones sharing one claim could not both be scheduled.
    claims = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "PersistentVolumeClaim"}
    cores = [d for d in manifests if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("core-")]
    zones = {}
    for core in cores:
        zone = core["spec"]["template"]["metadata"]["labels"]["meridian/zone"]
        names = [v["persistentVolumeClaim"]["claimName"] for v in core["spec"]["template"]["spec"]["volumes"]
                 if "persistentVolumeClaim" in v]
        assert len(names) == 1 and names[0] in claims, (zone, names)
        assert claims[names[0]]["metadata"]["labels"]["meridian/zone"] == zone
        zones[names[0]] = zone
    assert len(zones) == len(set(zones.values())) == len(cores) >= 2
