"""Running our images with podman in tests, the way deploy/docker/build_image.sh configures it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from deploy.source_digest import LABEL, digest


def podman_env() -> dict[str, str]:
    """The environment with the containers.conf that build_image.sh writes (runc, and rlimits the
    sandbox allows)."""
    cache = Path(os.environ.get("MERIDIAN_CACHE", Path.home() / ".cache" / "meridian"))
    conf = cache / "container" / "containers.conf"
    return {**os.environ, **({"CONTAINERS_CONF": str(conf)} if conf.exists() else {})}


def image_unavailable(image: str, make_target: str) -> str | None:
    """Why `image` cannot run here, or None."""
    if shutil.which("podman") is None:
        return f"podman is not installed (make {make_target} installs it on Debian as root)"
    if podman("image", "exists", image).returncode != 0:
        return f"image {image} is not built: run `make {make_target}`"
    built_from = podman("image", "inspect", "--format", f'{{{{ index .Labels "{LABEL}" }}}}', image).stdout.strip()
    if built_from != digest():
        return f"image {image} was built from other sources than this tree's: run `make {make_target}`"
    return None


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """One podman command; its output captured as text."""
    return subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, check=False,
                          timeout=timeout)


def logs(name: str) -> str:
    """The tail of a container's output, for a failing assertion's message."""
    out = podman("logs", "--tail", "60", name)
    return out.stdout + out.stderr
